"""ResultStore: the durable outbox of run results, waiting to be synced.

Each run has one row, written when it starts (``running``) and again when it ends. A
finished result is ``pending`` until the cloud acknowledges it (``synced``) or refuses it
(``quarantined``, with the reason). Guarantees:

* ``save`` returns only after the COMMIT holding its row returned, with WAL +
  ``synchronous=FULL``: the row survives a crash or a power cut. Saves from many
  coroutines are group-committed: one writer thread writes everything queued meanwhile in
  one transaction with one fsync, then answers each caller (an error reaches only the
  callers whose rows it failed; close() commits what is queued);
* ``save(..., durable=False)`` (a run's start record, which nobody has been told about)
  commits without waiting for fsync: a crash of the process keeps it, a power cut may
  not, until the next durable commit or ``flush`` covers it. Whoever tells someone about
  such a row first (POST /run's 202) calls ``flush``;
* ``get_pending`` reads a partial index, so its cost does not grow with the queue;
* retention deletes only synced results; a pending result is never deleted by retention;
* when the store reaches ``max_mb``, synced results make room first (they are safe in the
  cloud); then the policy applies: ``reject_new`` (default) or ``drop_oldest`` pending;
  every drop is counted and logged;
* runs left ``running`` by a process that died become ``interrupted`` when a store opens.
"""

import json
import logging
import os
import threading
import time
import weakref

from .. import defaults as D
from ..aio import run_blocking
from ..db import Database
from ..errors import BusyError, FmEdgeError, StorageError, StoreFullError, UsageError
from ..fsutil import free_bytes
from ..ids import validate_id
from ..process import owner_alive, owner_token

log = logging.getLogger("fmedge.results")

STATUSES = ("pending", "running", "completed", "failed", "cancelled", "timeout", "interrupted")
UNFINISHED = ("pending", "running")
SYNC_STATES = ("local", "pending", "synced", "quarantined")

_MIGRATIONS = [
    """
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,          -- insertion order: the upload order
        run_id TEXT NOT NULL UNIQUE,
        pipeline_id TEXT NOT NULL,
        pipeline_version TEXT,
        status TEXT NOT NULL,
        sync_state TEXT NOT NULL,        -- local (unfinished), pending, synced, quarantined
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        synced_at REAL,
        owner TEXT,
        sync_error TEXT,
        size INTEGER NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX results_pending ON results(id) WHERE sync_state = 'pending';
    CREATE INDEX results_local ON results(id) WHERE sync_state = 'local';
    CREATE INDEX results_synced ON results(synced_at) WHERE sync_state = 'synced';
    CREATE INDEX results_pipeline ON results(pipeline_id, id);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)
    """,
]
_EVICT_BATCH = 200
# Most rows one group commit writes: bounds one transaction's WAL growth and latency.
_GROUP_MAX = 256
# Space checks (see _make_room): bytes charged per row beyond its payload (a row touches
# a few index pages, and each commit appends whole 4 KiB pages to the WAL), and how often
# the disk is measured at least.
_ROW_SLACK = 16384
_MEASURE_EVERY_S = 1.0
# Rows per INSERT statement: 10 parameters each, within SQLite's old limit of 999.
_ROWS_PER_STATEMENT = 96
_UPSERT_HEAD = (
    "INSERT INTO results (run_id, pipeline_id, pipeline_version, status, sync_state, "
    "created_at, updated_at, owner, size, payload) VALUES ")
_UPSERT_TAIL = (
    " ON CONFLICT(run_id) DO UPDATE SET pipeline_id=excluded.pipeline_id, "
    "pipeline_version=excluded.pipeline_version, status=excluded.status, "
    "sync_state=excluded.sync_state, updated_at=excluded.updated_at, owner=excluded.owner, "
    "size=excluded.size, payload=excluded.payload, synced_at=NULL, sync_error=NULL")


def _upsert(rows, _cache={}):
    """The INSERT ... ON CONFLICT statement for ``rows`` rows (rows of one statement are
    applied in order: a run's later row wins over its earlier one)."""
    sql = _cache.get(rows)
    if sql is None:
        sql = _cache[rows] = (_UPSERT_HEAD + ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * rows)
                              + _UPSERT_TAIL)
    return sql


def encode_record(record):
    """A record's stored JSON text: compact, so the HTTP API can answer with it as is."""
    return json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":"))


class ResultStore:
    """The seed's API (``save``, ``get_pending``, ``mark_synced``) plus get/list/cleanup."""

    # Seconds the writer waits, idle, before it fsyncs rows committed without (see
    # _GroupWriter); read when the first save() starts the writer.
    flush_idle_s = 0.1

    def __init__(self, store_dir, retention_days=D.DEFAULT_RESULT_RETENTION_DAYS,
                 max_mb=D.DEFAULT_RESULT_STORE_MAX_MB,
                 full_policy=D.DEFAULT_RESULT_STORE_FULL_POLICY,
                 min_free_mb=D.DEFAULT_MIN_FREE_DISK_MB, clock=time.time):
        if full_policy not in D.RESULT_STORE_FULL_POLICIES:
            raise UsageError(f"unknown result store policy {full_policy!r}: use one of "
                             + ", ".join(D.RESULT_STORE_FULL_POLICIES))
        self.store_dir = os.path.abspath(os.path.expanduser(store_dir))
        self.retention_days = retention_days
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.full_policy = full_policy
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.clock = clock
        self._owner = owner_token()
        self.db = Database(os.path.join(self.store_dir, D.RESULT_DB_NAME), _MIGRATIONS)
        self.commits = 0            # transactions that wrote saved rows (group commits count 1)
        self._writer = None         # the group-commit thread, started by the first save()
        self._writer_lock = threading.Lock()
        self._closed = False
        self._budget = 0            # bytes writable before space is measured again
        self._measure_by = 0.0
        self.recovered = self.recover_interrupted()

    # -- the seed's async API ---------------------------------------------------------

    async def save(self, run_id, result, durable=True):
        """Store ``result`` for ``run_id``; returns (the record) once the COMMIT holding it
        returned: on disk, fsynced. Concurrent saves share one transaction and one fsync.

        ``durable=False`` skips waiting for fsync: the row survives a crash of this process
        but a power cut may undo it, until a later durable commit (or ``flush``) covers it.
        Only for rows nobody has been told about yet (a run's start record).
        """
        return await self.queue_save(run_id, result, durable)

    def queue_save(self, run_id, result, durable=True, on_done=None):
        """``save`` without waiting: queues the row and returns the asyncio future that
        ``save`` awaits (the record, or the error). Rows are committed in queue order, so
        a run's later row still wins over an earlier one that nobody waited for.

        With ``on_done``, no future: ``on_done(outcome, payload)`` is called in the writer
        thread once the row is committed (outcome: the record, or the error; payload: the
        row's JSON text), for callers in other threads that would otherwise need a hop
        through an event loop to learn it (the HTTP API's waiting requests).
        """
        write = self._prepare(run_id, result, durable)
        if on_done is None:
            import asyncio  # imported here: the CLI's fast paths never need asyncio

            loop = asyncio.get_running_loop()
            write.loop, write.future = loop, loop.create_future()
        else:
            write.on_done = on_done
        self._group_writer().put(write)
        return write.future

    async def flush(self):
        """Returns once every row committed so far is durable, ``durable=False`` ones
        included: call it before telling anyone about such a row."""
        if self.db.unsynced:
            await run_blocking(self.flush_now)

    async def get_pending(self, limit=100, after_id=0):
        """Finished results not yet synced, oldest first (each with ``_seq`` for paging)."""
        return await run_blocking(self.pending_now, limit, after_id)

    async def mark_synced(self, run_ids):
        """Mark one run id (or a list) as acknowledged by the cloud; returns how many."""
        return await run_blocking(self.mark_synced_now, run_ids)

    async def get(self, run_id):
        return await run_blocking(self.get_now, run_id)

    async def list(self, **filters):
        return await run_blocking(lambda: self.list_now(**filters))

    async def cleanup(self):
        return await run_blocking(self.cleanup_now)

    async def quarantine(self, run_id, reason):
        return await run_blocking(self.quarantine_now, run_id, reason)

    # -- blocking implementation (used by the CLI directly) ---------------------------

    def save_now(self, run_id, result, durable=True):
        """``save`` for blocking callers (the CLI): its own transaction, in this thread."""
        write = self._prepare(run_id, result, durable)
        self._write([write])
        return write.record

    def flush_now(self):
        self.db.make_durable()     # one fsync, or nothing when every commit is durable

    def pending_now(self, limit=100, after_id=0):
        rows = self.db.execute(
            "SELECT id, payload FROM results WHERE sync_state = 'pending' AND id > ? "
            "ORDER BY id LIMIT ?", (int(after_id), int(limit)))
        return [dict(json.loads(payload), _seq=seq) for seq, payload in rows]

    def pending_texts(self, limit=100, after_id=0):
        """[(seq, run_id, payload JSON text)] of pending results, oldest first: for callers
        that send the stored JSON as it is (sync), without parsing it."""
        return self.db.execute(
            "SELECT id, run_id, payload FROM results WHERE sync_state = 'pending' AND id > ? "
            "ORDER BY id LIMIT ?", (int(after_id), int(limit)))

    def iter_pending(self, batch_size=500):
        """Every pending result, oldest first, read ``batch_size`` rows at a time."""
        after = 0
        while True:
            batch = self.pending_now(batch_size, after)
            if not batch:
                return
            yield from batch
            after = batch[-1]["_seq"]

    def mark_synced_now(self, run_ids):
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        now = self.clock()
        # Not fsynced: a mark lost to a power cut only makes the result go up again, and
        # the cloud de-duplicates it by run_id.
        with self.db.transaction(durable=False) as conn:
            changed = conn.executemany(
                "UPDATE results SET sync_state='synced', synced_at=?, sync_error=NULL "
                "WHERE run_id=? AND sync_state='pending'",
                [(now, run_id) for run_id in ids]).rowcount
        return changed

    def quarantine_now(self, run_id, reason):
        """Set a result the cloud refused aside, with the reason; it no longer blocks."""
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE results SET sync_state='quarantined', sync_error=? "
                "WHERE run_id=? AND sync_state='pending'", (str(reason), run_id)).rowcount
        if changed:
            self._count("quarantined", changed)
            log.warning("result %s quarantined: the cloud refused it: %s", run_id, reason)
        return changed

    def get_now(self, run_id):
        """The result as saved, plus ``sync_state`` and ``sync_error``; None if unknown."""
        row = self.db.query_one(
            "SELECT payload, sync_state, sync_error FROM results WHERE run_id=?", (run_id,))
        if row is None:
            return None
        return dict(json.loads(row[0]), sync_state=row[1], sync_error=row[2])

    def list_now(self, status=None, pipeline_id=None, sync_state=None, limit=50):
        """Summaries of the newest results, filtered; newest first."""
        where, params = _filters(status=status, pipeline_id=pipeline_id,
                                 sync_state=sync_state)
        rows = self.db.execute(
            "SELECT run_id, pipeline_id, pipeline_version, status, sync_state, created_at, "
            f"updated_at, sync_error FROM results {where} ORDER BY id DESC LIMIT ?",
            params + [int(limit)])
        keys = ("run_id", "pipeline_id", "pipeline_version", "status", "sync_state",
                "created_at", "updated_at", "sync_error")
        return [dict(zip(keys, row)) for row in rows]

    def stats(self):
        """Counts by sync state and status, bytes used, and the drop counters."""
        by_state = dict(self.db.execute(
            "SELECT sync_state, COUNT(*) FROM results GROUP BY sync_state"))
        return {
            "pending": by_state.get("pending", 0),
            "synced": by_state.get("synced", 0),
            "quarantined": by_state.get("quarantined", 0),
            "running": by_state.get("local", 0),
            "bytes": self.db.used_bytes(),
            "max_bytes": self.max_bytes,
            "counters": self.counters(),
        }

    def counters(self):
        return dict(self.db.execute("SELECT name, value FROM counters ORDER BY name"))

    def cleanup_now(self):
        """Delete synced results older than ``retention_days``; returns how many."""
        cutoff = self.clock() - self.retention_days * 86400.0
        with self.db.transaction() as conn:
            removed = conn.execute(
                "DELETE FROM results WHERE sync_state='synced' AND synced_at < ?",
                (cutoff,)).rowcount
        if removed:
            self._count("retention_deleted", removed)
            log.info("retention: deleted %d synced results older than %g days",
                     removed, self.retention_days)
        return removed

    def clear(self, include_pending=False):
        """Delete finished results: synced and quarantined; pending only when asked."""
        states = ("synced", "quarantined", "pending") if include_pending else (
            "synced", "quarantined")
        marks = ",".join("?" * len(states))
        with self.db.transaction() as conn:
            removed = conn.execute(
                f"DELETE FROM results WHERE sync_state IN ({marks})", states).rowcount
        if include_pending:
            log.warning("clear-cache: deleted %d results, pending ones included", removed)
        return removed

    def recover_interrupted(self):
        """Runs left unfinished by a dead process become ``interrupted``; returns run ids."""
        rows = self.db.execute(
            "SELECT run_id, owner, payload FROM results WHERE sync_state='local'")
        dead = [(run_id, payload) for run_id, owner, payload in rows
                if not owner_alive(owner or "")]
        for run_id, payload in dead:
            record = json.loads(payload)
            record.update(status="interrupted", error=record.get("error") or
                          "the process running it stopped before the run finished")
            self._rewrite(run_id, record, "pending")
            log.warning("run %s was interrupted by a crash or shutdown; marked interrupted",
                        run_id)
        return [run_id for run_id, _ in dead]

    def _rewrite(self, run_id, record, state):
        """Replace a row's payload and state in place (no space check: it does not grow)."""
        payload = encode_record(record)
        with self.db.transaction() as conn:
            conn.execute("UPDATE results SET status=?, sync_state=?, updated_at=?, size=?, "
                         "payload=? WHERE run_id=?", (record["status"], state, self.clock(),
                                                      len(payload), payload, run_id))

    def integrity_ok(self):
        return self.db.integrity_ok()

    def close(self):
        """Commit what is queued (answering its callers), then close the file."""
        with self._writer_lock:
            self._closed = True
            writer = self._writer
        if writer is not None:
            writer.close()
        self.db.close()

    # -- writing ------------------------------------------------------------------------

    def _prepare(self, run_id, result, durable):
        """Check and encode a row in the caller's thread, so a bad one fails its caller."""
        validate_id(run_id, "run")
        record = _record(run_id, result)
        payload = encode_record(record)
        return _Write(record, payload, durable)

    def _group_writer(self):
        with self._writer_lock:
            if self._closed:
                raise StorageError(f"the result store {self.store_dir} is closed: nothing "
                                   "more can be saved through it; open it again")
            if self._writer is None:
                self._writer = _GroupWriter(self, self.flush_idle_s)
            return self._writer

    def _write_group(self, writes):
        """Commit ``writes`` together; returns each one's outcome (its record or error)."""
        try:
            self._write(writes)
            return [write.record for write in writes]
        except BusyError as error:
            # Another process holds the file: alone, each would wait just as long again.
            return [error] * len(writes)
        except FmEdgeError as error:
            if len(writes) == 1:
                return [error]
        # One row that does not fit (store or disk full) must not fail its neighbours.
        outcomes = []
        for write in writes:
            try:
                self._write([write])
                outcomes.append(write.record)
            except FmEdgeError as error:
                outcomes.append(error)
        return outcomes

    def _write(self, writes):
        """One transaction for ``writes``; durable (one fsync) if any of them asks."""
        with self.db.lock:
            # Space is checked once per group; the rejection is counted once per row
            # refused, so a failed group (retried row by row) counts nothing itself.
            self._make_room(sum(len(w.payload) for w in writes), len(writes),
                            count=len(writes) == 1)
            now = self.clock()
            rows = [(w.record["run_id"], w.record["pipeline_id"],
                     w.record.get("pipeline_version"), w.record["status"],
                     "local" if w.record["status"] in UNFINISHED else "pending",
                     now, now, self._owner, len(w.payload), w.payload) for w in writes]
            # Many rows per statement, and a group that fits one statement is that
            # statement alone, committed by itself: each call into SQLite gives up the GIL
            # and must win it back, which costs more than a row under load.
            durable = any(w.durable for w in writes)
            if len(rows) <= _ROWS_PER_STATEMENT:
                self.db.write(_upsert(len(rows)), [v for row in rows for v in row], durable)
            else:
                with self.db.transaction(durable=durable) as conn:
                    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                        chunk = rows[start:start + _ROWS_PER_STATEMENT]
                        conn.execute(_upsert(len(chunk)), [v for row in chunk for v in row])
            self.commits += 1

    # -- space --------------------------------------------------------------------------

    def _make_room(self, incoming, rows=1, count=True):
        """Refuse ``incoming`` bytes (or evict for them) when the store or its disk is full.

        Measuring costs a statvfs and a page count, so a measurement grants a budget of
        half the headroom it found; commits spend it (each row charged its size plus
        _ROW_SLACK for index pages and WAL growth) and the next commit past it, or past
        _MEASURE_EVERY_S (other programs fill disks too), measures again. Near a limit
        the budget is small, so every commit is measured there.
        """
        charge = incoming + rows * _ROW_SLACK
        if charge <= self._budget and time.monotonic() < self._measure_by:
            self._budget -= charge
            return
        self._budget = 0
        # Checked with the slack too: a group that fails half-written leaves the WAL file
        # grown, and then even its rows retried one by one would find the disk full.
        free = self._check_free_disk(charge, count)
        used = self.db.used_bytes()
        while used + incoming > self.max_bytes:
            if not (self._evict("synced", "evicted_synced_for_space") or (
                    self.full_policy == "drop_oldest" and
                    self._evict("pending", "dropped_oldest"))):
                raise StoreFullError(
                    f"result store {self.store_dir} is full ({self.max_bytes // 1048576} "
                    f"MB, policy {self.full_policy}): results are waiting to sync; "
                    "reconnect the cloud, raise result_store_max_mb, or set "
                    "result_store_full_policy to drop_oldest")
            used = self.db.used_bytes()
        headroom = min(self.max_bytes - used, free - self.min_free_bytes) - charge
        self._budget = max(0, headroom // 2)
        self._measure_by = time.monotonic() + _MEASURE_EVERY_S

    def _check_free_disk(self, incoming, count=True):
        """The disk's free bytes; raises when ``incoming`` would leave too few."""
        free = free_bytes(self.store_dir)
        if free - incoming < self.min_free_bytes:
            if count:
                self._count("rejected_disk_full", 1)
            raise StoreFullError(
                f"the disk holding {self.store_dir} has less than "
                f"{self.min_free_bytes // 1048576} MB free: free space on it, or lower "
                "min_free_disk_mb")
        return free

    def _evict(self, state, counter):
        with self.db.transaction() as conn:
            rows = conn.execute(
                f"SELECT id, run_id FROM results WHERE sync_state=? ORDER BY id LIMIT "
                f"{_EVICT_BATCH}", (state,)).fetchall()
            if rows:
                conn.execute("DELETE FROM results WHERE id <= ? AND sync_state=?",
                             (rows[-1][0], state))
        if rows:
            self._count(counter, len(rows))
            level = logging.WARNING if state == "pending" else logging.INFO
            log.log(level, "result store full: %s %d %s results (oldest %s)", counter,
                    len(rows), state, rows[0][1])
        return bool(rows)

    def _count(self, name, amount):
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) "
                         "DO UPDATE SET value = value + excluded.value", (name, amount))


class _Write:
    """One row waiting to be committed, and who waits for it."""

    __slots__ = ("record", "payload", "durable", "loop", "future", "on_done")

    def __init__(self, record, payload, durable):
        self.record, self.payload, self.durable = record, payload, durable
        self.loop = self.future = self.on_done = None


class _GroupWriter:
    """The thread that commits queued saves in groups: everything queued while one
    commit (and its fsync) ran goes into the next transaction, so N concurrent saves
    cost a few fsyncs instead of N, with no timer delaying a lone save.

    Rows committed without fsync get one once nothing else came for ``idle_s`` (under
    load the next durable commit covers them sooner): a power cut can undo a run's start
    record only within that moment, not for as long as a long run lasts.
    """

    def __init__(self, store, idle_s):
        # Weakly: a store dropped without close() stops its writer (and then closes its
        # file), as before it had one. Nothing can be queued then: a waiting save holds
        # the store.
        self._write_group = weakref.WeakMethod(store._write_group)
        weakref.finalize(store, self.stop)
        self._db = store.db
        self._idle_s = idle_s
        self._flush_failed = False
        self._queue = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="fmedge-results-writer")
        self._thread.start()

    def put(self, write):
        with self._cond:
            self._queue.append(write)
            self._cond.notify()

    def stop(self):
        """Let the thread end once it has committed everything queued."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def close(self):
        self.stop()
        self._thread.join()

    def _run(self):
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(self._idle_s if self._db.unsynced else None)
                if not self._queue:
                    if self._closing:
                        return
                    group = None
                else:
                    group = self._queue[:_GROUP_MAX]
                    del self._queue[:_GROUP_MAX]
            if group is None:
                self._flush_idle()
            else:
                self._commit(group)

    def _commit(self, group):
        # One transaction for the whole group, in queue order (a run's later row wins).
        # Start records are not split off into a quicker commit of their own: the
        # executor queues them without waiting, so nobody would gain from it.
        write_group = self._write_group()    # held only while writing (see __init__)
        try:
            outcomes = write_group(group)
        except Exception as error:           # a bug must reach the callers, not hang them
            log.exception("result store: writing %d results failed", len(group))
            outcomes = [error] * len(group)
        _answer(group, outcomes)

    def _flush_idle(self):
        try:
            self._db.make_durable()
            self._flush_failed = False
        except FmEdgeError as error:     # retried at the next idle moment; said once
            if not self._flush_failed:
                log.error("result store: cannot fsync the latest start records: %s", error)
            self._flush_failed = True


def _answer(writes, outcomes):
    """Resolve each caller's future in its own event loop (one wake-up per loop), and
    call the ``on_done`` callbacks here."""
    by_loop = {}
    for write, outcome in zip(writes, outcomes):
        if write.on_done is not None:
            try:
                write.on_done(outcome, write.payload)
            except Exception:      # the caller's bug must not stop the writer
                log.exception("result store: a save callback failed")
            continue
        by_loop.setdefault(write.loop, []).append((write.future, outcome))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, answers)
        except RuntimeError:    # that loop is closed: nobody waits for these any more
            pass


def _resolve(answers):
    for future, outcome in answers:
        if future.done():       # the caller was cancelled meanwhile; the row is written
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _record(run_id, result):
    """The result as a JSON-ready dict with run_id, pipeline_id and a known status."""
    if hasattr(result, "to_dict"):
        result = result.to_dict()
    if not isinstance(result, dict):
        raise UsageError(f"result for run {run_id} must be a dict or an ExecutionResult, "
                         f"got {type(result).__name__}")
    record = dict(result, run_id=run_id)
    record.setdefault("pipeline_id", "")
    status = record.setdefault("status", "completed")
    if status not in STATUSES:
        raise UsageError(f"result for run {run_id} has unknown status {status!r}: use one "
                         "of " + ", ".join(STATUSES))
    return record


def _filters(**conditions):
    where, params = [], []
    for column, value in conditions.items():
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return ("WHERE " + " AND ".join(where) if where else ""), params
