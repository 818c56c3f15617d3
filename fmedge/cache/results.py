"""ResultStore: the durable outbox of run results, waiting to be synced.

Each run has one row, written when it starts (``running``) and again when it ends. A
finished result is ``pending`` until the cloud acknowledges it (``synced``) or refuses it
(``quarantined``, with the reason). Guarantees:

* ``save`` returns only after COMMIT with WAL + ``synchronous=FULL``: the row survives a
  crash or a power cut;
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
import time

from .. import defaults as D
from ..aio import run_blocking
from ..db import Database
from ..errors import StoreFullError, UsageError
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


class ResultStore:
    """The seed's API (``save``, ``get_pending``, ``mark_synced``) plus get/list/cleanup."""

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
        self.recovered = self.recover_interrupted()

    # -- the seed's async API ---------------------------------------------------------

    async def save(self, run_id, result):
        """Store ``result`` for ``run_id`` durably; returns once it is on disk."""
        return await run_blocking(self.save_now, run_id, result)

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

    def save_now(self, run_id, result):
        validate_id(run_id, "run")
        record = _record(run_id, result)
        payload = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
        state = "local" if record["status"] in UNFINISHED else "pending"
        now = self.clock()
        self._make_room(len(payload))
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO results (run_id, pipeline_id, pipeline_version, status, "
                "sync_state, created_at, updated_at, owner, size, payload) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
                "pipeline_id=excluded.pipeline_id, pipeline_version=excluded.pipeline_version,"
                " status=excluded.status, sync_state=excluded.sync_state, "
                "updated_at=excluded.updated_at, owner=excluded.owner, size=excluded.size, "
                "payload=excluded.payload, synced_at=NULL, sync_error=NULL",
                (run_id, record["pipeline_id"], record.get("pipeline_version"),
                 record["status"], state, now, now, self._owner, len(payload), payload))
        return record

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
        payload = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
        with self.db.transaction() as conn:
            conn.execute("UPDATE results SET status=?, sync_state=?, updated_at=?, size=?, "
                         "payload=? WHERE run_id=?", (record["status"], state, self.clock(),
                                                      len(payload), payload, run_id))

    def integrity_ok(self):
        return self.db.integrity_ok()

    def close(self):
        self.db.close()

    # -- space --------------------------------------------------------------------------

    def _make_room(self, incoming):
        self._check_free_disk(incoming)
        while self.db.used_bytes() + incoming > self.max_bytes:
            if self._evict("synced", "evicted_synced_for_space"):
                continue
            if self.full_policy == "drop_oldest" and self._evict("pending", "dropped_oldest"):
                continue
            raise StoreFullError(
                f"result store {self.store_dir} is full ({self.max_bytes // 1048576} MB, "
                f"policy {self.full_policy}): results are waiting to sync; reconnect the "
                "cloud, raise result_store_max_mb, or set result_store_full_policy "
                "to drop_oldest")

    def _check_free_disk(self, incoming):
        if free_bytes(self.store_dir) - incoming < self.min_free_bytes:
            self._count("rejected_disk_full", 1)
            raise StoreFullError(
                f"the disk holding {self.store_dir} has less than "
                f"{self.min_free_bytes // 1048576} MB free: free space on it, or lower "
                "min_free_disk_mb")

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
