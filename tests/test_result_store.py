"""ResultStore: durability, the pending queue, retention, full-store policies, corruption."""

import asyncio
import gc
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from fmedge.cache import ResultStore
from fmedge.errors import StorageError, StoreFullError, UsageError
from clock import FakeClock
from conftest import ROOT, clean_env
from fsfixtures import can_mount, tmpfs


@pytest.fixture
def clock():
    return FakeClock()


def open_store(path, clock=None, **kwargs):
    kwargs.setdefault("min_free_mb", 0)
    return ResultStore(str(path), clock=clock or time.time, **kwargs)


def finished(pipeline="p", status="completed", **extra):
    return dict(pipeline_id=pipeline, status=status, output={"ok": True}, **extra)


def test_save_pending_mark_synced(tmp_path):
    store = open_store(tmp_path)
    store.save_now("r1", finished())
    store.save_now("r2", finished(status="failed", error="boom"))
    pending = store.pending_now()
    assert [r["run_id"] for r in pending] == ["r1", "r2"]
    assert pending[1]["error"] == "boom"
    assert store.mark_synced_now("r1") == 1
    assert store.mark_synced_now(["r1", "r2", "unknown"]) == 1
    assert store.pending_now() == []
    assert store.get_now("r1")["sync_state"] == "synced"
    assert store.stats()["synced"] == 2


def test_running_results_are_not_pending_until_they_finish(tmp_path):
    store = open_store(tmp_path)
    store.save_now("r1", finished(status="running"))
    assert store.pending_now() == [] and store.stats()["running"] == 1
    store.save_now("r1", finished())
    assert [r["run_id"] for r in store.pending_now()] == ["r1"]


def test_pending_is_paged_oldest_first(tmp_path):
    store = open_store(tmp_path)
    for i in range(25):
        store.save_now(f"r{i:02d}", finished())
    ids = [r["run_id"] for r in store.iter_pending(batch_size=7)]
    assert ids == [f"r{i:02d}" for i in range(25)]
    first = store.pending_now(limit=10)
    after = store.pending_now(limit=10, after_id=first[-1]["_seq"])
    assert after[0]["run_id"] == "r10"


def test_get_pending_is_served_by_the_partial_index(tmp_path):
    store = open_store(tmp_path)
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT id, payload FROM results WHERE sync_state = 'pending' "
        "AND id > ? ORDER BY id LIMIT ?", (0, 10))
    assert "results_pending" in " ".join(str(row) for row in plan)


def test_retention_deletes_only_old_synced_results(tmp_path, clock):
    store = open_store(tmp_path, clock, retention_days=30)
    store.save_now("old-synced", finished())
    store.save_now("old-pending", finished())
    store.mark_synced_now("old-synced")
    clock.advance(days=31)
    store.save_now("new-synced", finished())
    store.mark_synced_now("new-synced")
    assert store.cleanup_now() == 1
    assert store.get_now("old-synced") is None
    assert store.get_now("new-synced") is not None
    clock.advance(days=3650)
    store.cleanup_now()
    assert store.get_now("old-pending")["sync_state"] == "pending"   # never by retention
    assert store.counters()["retention_deleted"] == 2


def payload(kb):
    return finished(blob="x" * (kb * 1024))


def test_full_store_rejects_new_by_default_after_evicting_synced(tmp_path):
    store = open_store(tmp_path, max_mb=1)
    store.save_now("synced-0", payload(100))
    store.mark_synced_now("synced-0")
    saved = 1
    with pytest.raises(StoreFullError, match="result_store_max_mb"):
        for i in range(40):
            store.save_now(f"p{i}", payload(100))
            saved += 1
    assert store.get_now("synced-0") is None           # synced ones make room first
    assert store.counters()["evicted_synced_for_space"] == 1
    assert all(store.get_now(f"p{i}") for i in range(saved - 1))   # no pending lost
    assert store.stats()["pending"] == saved - 1


def test_full_store_drop_oldest_counts_every_drop(tmp_path):
    store = open_store(tmp_path, max_mb=1, full_policy="drop_oldest")
    for i in range(30):
        store.save_now(f"p{i:02d}", payload(100))
    dropped = store.counters()["dropped_oldest"]
    assert dropped > 0
    assert store.get_now("p00") is None and store.get_now("p29") is not None
    assert store.stats()["pending"] + dropped == 30


def test_unknown_policy_and_status_are_refused(tmp_path):
    with pytest.raises(UsageError, match="reject_new, drop_oldest"):
        open_store(tmp_path, full_policy="yolo")
    with pytest.raises(UsageError, match="unknown status 'done'"):
        open_store(tmp_path).save_now("r", {"status": "done"})


def test_quarantine_sets_a_refused_result_aside(tmp_path):
    store = open_store(tmp_path)
    store.save_now("bad", finished())
    store.save_now("good", finished())
    assert store.quarantine_now("bad", "schema mismatch") == 1
    assert [r["run_id"] for r in store.pending_now()] == ["good"]
    assert store.get_now("bad")["sync_error"] == "schema mismatch"


def test_corrupt_file_is_moved_aside_never_deleted(tmp_path, caplog):
    db = tmp_path / "results.db"
    db.write_bytes(b"this is not a database at all" * 100)
    store = open_store(tmp_path)
    corrupt = [p for p in os.listdir(tmp_path) if p.startswith("results.db.corrupt-")]
    assert corrupt == [os.path.basename(store.db.quarantined_to)]
    assert (tmp_path / corrupt[0]).read_bytes().startswith(b"this is not a database")
    assert "corrupt" in caplog.text
    store.save_now("fresh", finished())
    assert store.integrity_ok()


def test_interrupted_runs_are_recovered_but_live_ones_are_not(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from fmedge.cache import ResultStore; "
         "ResultStore(sys.argv[1], min_free_mb=0).save_now('dead', "
         "{'pipeline_id': 'p', 'status': 'running'})", str(tmp_path)],
        env=clean_env(), cwd=ROOT, check=True)
    assert child.returncode == 0
    mine = open_store(tmp_path)
    assert mine.recovered == ["dead"]
    mine.save_now("alive", finished(status="running"))
    again = open_store(tmp_path)               # this process is alive: its run is kept
    assert again.recovered == []
    assert again.get_now("dead")["status"] == "interrupted"
    assert again.get_now("dead")["sync_state"] == "pending"
    assert again.get_now("alive")["status"] == "running"


WRITER = r"""
import sys
from fmedge.cache import ResultStore
store = ResultStore(sys.argv[1], min_free_mb=0)
cycle = sys.argv[2]
store.save_now(f"{cycle}-running", {"pipeline_id": "p", "status": "running"})
print("START", flush=True)
i = 0
while True:
    run_id = f"{cycle}-{i}"
    store.save_now(run_id, {"pipeline_id": "p", "status": "completed", "output": i})
    print("ACK", run_id, flush=True)
    i += 1
"""


def test_sigkill_mid_write_loses_no_acknowledged_result(tmp_path):
    rng = random.Random(7)
    acknowledged = []
    for cycle in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"c{cycle}"],
                                stdout=subprocess.PIPE, universal_newlines=True,
                                env=clean_env(), cwd=ROOT)
        assert proc.stdout.readline().strip() == "START"
        for _ in range(rng.randint(1, 40)):
            acknowledged.append(proc.stdout.readline().split()[1])
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:             # acks printed before the kill landed
            acknowledged.append(line.split()[1])
        proc.wait()
    store = open_store(tmp_path)
    assert store.integrity_ok()
    missing = [run_id for run_id in acknowledged if store.get_now(run_id) is None]
    assert missing == []
    # Each writer's open recovered the run its killed predecessor left running.
    assert all(store.get_now(f"c{c}-running")["status"] == "interrupted" for c in range(8))
    assert store.stats()["running"] == 0


@pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")
def test_full_disk_is_a_clear_error_and_nothing_is_lost():
    with tmpfs("1m") as mount:
        store = open_store(mount, max_mb=100)
        saved = []
        with pytest.raises(StorageError) as info:
            for i in range(200):
                store.save_now(f"r{i}", payload(8))
                saved.append(f"r{i}")
        assert "space" in str(info.value) or "full" in str(info.value)
        store.close()
        reopened = open_store(mount, max_mb=100)
        assert reopened.integrity_ok()
        assert all(reopened.get_now(run_id) for run_id in saved)


@pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")
def test_min_free_disk_guard_refuses_before_the_disk_is_full():
    with tmpfs("2m") as mount:
        store = ResultStore(mount, min_free_mb=1.5)
        with pytest.raises(StoreFullError, match="min_free_disk_mb"):
            for i in range(200):
                store.save_now(f"r{i}", payload(8))
        assert store.counters()["rejected_disk_full"] >= 1
        assert store.integrity_ok()


def test_seed_async_api(tmp_path):
    async def scenario():
        store = ResultStore(store_dir=str(tmp_path), retention_days=30)
        await store.save("run-1", {"pipeline_id": "p", "status": "completed"})
        pending = await store.get_pending()
        assert [r["run_id"] for r in pending] == ["run-1"]
        assert await store.mark_synced("run-1") == 1
        assert (await store.get("run-1"))["sync_state"] == "synced"
        assert await store.cleanup() == 0
        assert [r["run_id"] for r in await store.list()] == ["run-1"]
    asyncio.run(scenario())


def test_database_really_uses_wal_and_full_sync(tmp_path):
    store = open_store(tmp_path)
    assert store.db.query_one("PRAGMA journal_mode")[0] == "wal"
    assert store.db.query_one("PRAGMA synchronous")[0] == 2      # FULL
    store.save_now("r", finished())
    store.mark_synced_now("r")          # committed without fsync (safe to lose) ...
    assert store.db.query_one("PRAGMA synchronous")[0] == 2      # ... then FULL again
    raw = sqlite3.connect(str(tmp_path / "results.db"))
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1


# -- group commit -------------------------------------------------------------------------

def saves(store, items):
    """Start ``store.save`` for every (run_id, result), with the store's database lock held
    (as a commit in progress holds it) so that they queue up behind it; then let go and
    return each one's outcome: its record, or the exception it raised."""
    async def scenario():
        with store.db.lock:
            tasks = [asyncio.ensure_future(store.save(run_id, result))
                     for run_id, result in items]
            await asyncio.sleep(0)          # each task runs up to its queued write
        return await asyncio.gather(*tasks, return_exceptions=True)
    return asyncio.run(scenario())


def test_concurrent_saves_share_commits_and_all_survive_reopening(tmp_path):
    store = open_store(tmp_path)
    before = store.commits
    outcomes = saves(store, [(f"r{i:03d}", finished(n=i)) for i in range(100)])
    assert [o["run_id"] for o in outcomes] == [f"r{i:03d}" for i in range(100)]
    # The writer took at most the first save alone before the lock stopped it; every
    # other save queued meanwhile went into one transaction.
    assert store.commits - before <= 2
    store.close()
    reopened = open_store(tmp_path)
    assert reopened.integrity_ok()
    assert [reopened.get_now(f"r{i:03d}")["n"] for i in range(100)] == list(range(100))
    assert reopened.stats()["pending"] == 100


def test_a_row_that_does_not_fit_fails_only_its_own_caller(tmp_path):
    store = open_store(tmp_path, max_mb=1)
    items = [("small-1", payload(1)), ("huge", payload(1500)), ("small-2", payload(1)),
             ("small-3", payload(1))]
    outcomes = dict(zip([run_id for run_id, _ in items], saves(store, items)))
    assert isinstance(outcomes.pop("huge"), StoreFullError)
    assert all(record["status"] == "completed" for record in outcomes.values())
    assert store.get_now("huge") is None
    assert sorted(r["run_id"] for r in store.pending_now()) == ["small-1", "small-2",
                                                                "small-3"]


def test_a_full_disk_fails_the_callers_it_refused_and_keeps_the_rest():
    if not can_mount():
        pytest.skip("mounting a small tmpfs needs root")
    with tmpfs("1m") as mount:
        store = open_store(mount, max_mb=100)
        items = [(f"r{i:03d}", payload(8)) for i in range(150)]
        outcomes = saves(store, items)
        saved = [run_id for (run_id, _), o in zip(items, outcomes) if isinstance(o, dict)]
        refused = [o for o in outcomes if not isinstance(o, dict)]
        assert saved and refused
        assert all(isinstance(o, (StorageError, StoreFullError)) for o in refused)
        store.close()
        reopened = open_store(mount, max_mb=100)
        assert reopened.integrity_ok()
        assert all(reopened.get_now(run_id) for run_id in saved)


def test_close_commits_what_is_queued_and_answers_its_callers(tmp_path):
    store = open_store(tmp_path)

    async def scenario():
        tasks = [asyncio.ensure_future(store.save(f"r{i}", finished())) for i in range(20)]
        await asyncio.sleep(0)               # all 20 are queued (or being written)
        store.close()                        # blocks this loop until they are committed
        records = await asyncio.gather(*tasks)
        with pytest.raises(StorageError, match="closed"):
            await store.save("late", finished())
        return records

    assert len(asyncio.run(scenario())) == 20
    reopened = open_store(tmp_path)
    assert all(reopened.get_now(f"r{i}") for i in range(20))


def test_saves_from_several_event_loops_are_answered_in_their_own(tmp_path):
    store = open_store(tmp_path)

    def loop_saving(prefix, out):
        async def scenario():
            return await asyncio.gather(*[store.save(f"{prefix}{i}", finished())
                                          for i in range(10)])
        out.extend(asyncio.run(scenario()))

    first, second = [], []
    threads = [threading.Thread(target=loop_saving, args=("a", first)),
               threading.Thread(target=loop_saving, args=("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [r["run_id"] for r in first] == [f"a{i}" for i in range(10)]
    assert [r["run_id"] for r in second] == [f"b{i}" for i in range(10)]


def test_rows_saved_without_fsync_become_durable_with_the_next_durable_commit(tmp_path,
                                                                             clock):
    store = open_store(tmp_path, clock)
    store.flush_idle_s = None              # no fsync of its own when idle: see below

    async def scenario():
        await store.save("start", finished(status="running"), durable=False)
        assert store.db.unsynced                   # committed, not yet fsynced
        await store.flush()
        assert not store.db.unsynced
        await store.save("start", finished(status="running"), durable=False)
        # The same row again, same clock: this transaction changes no page, yet its
        # commit must still fsync what the previous one left unsynced.
        await store.save("start", finished(status="running"))
        assert not store.db.unsynced

    asyncio.run(scenario())
    assert store.get_now("start")["status"] == "running"
    store.save_now("other", finished(), durable=False)
    assert store.db.unsynced
    store.flush_now()
    assert not store.db.unsynced
    store.flush_now()                              # nothing to do: no commit of its own


def test_rows_saved_without_fsync_are_fsynced_once_the_writer_is_idle(tmp_path):
    store = open_store(tmp_path)

    async def scenario():
        await store.save("start", finished(status="running"), durable=False)
        deadline = time.monotonic() + 30
        while store.db.unsynced:
            assert time.monotonic() < deadline, "the idle writer never fsynced"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    store.close()


def test_a_store_dropped_without_close_stops_its_writer(tmp_path):
    store = open_store(tmp_path)
    asyncio.run(store.save("r", finished()))
    writer = store._writer._thread
    assert writer.is_alive()
    del store
    gc.collect()
    deadline = time.monotonic() + 30
    while writer.is_alive():
        assert time.monotonic() < deadline, "the writer of a dropped store kept running"
        writer.join(0.05)
    assert open_store(tmp_path).get_now("r")["status"] == "completed"


def test_a_group_over_one_statement_is_one_commit_and_a_later_row_wins(tmp_path):
    store = open_store(tmp_path)
    items = [(f"r{i:03d}", finished(n=i)) for i in range(250)]
    items.append(("r007", finished(n="again")))       # the same run, queued later
    before = store.commits
    outcomes = saves(store, items)
    assert all(isinstance(o, dict) for o in outcomes)
    assert store.commits - before <= 2
    assert store.get_now("r007")["n"] == "again"
    assert store.get_now("r249")["n"] == 249 and store.stats()["pending"] == 250


def test_on_done_is_called_in_the_writer_thread_without_an_event_loop(tmp_path):
    store = open_store(tmp_path, max_mb=1)
    heard = []
    done = threading.Event()

    def on_done(outcome, payload):
        heard.append((outcome, payload, threading.current_thread().name))
        if len(heard) == 2:
            done.set()

    # From a plain thread: no event loop anywhere.
    assert store.queue_save("fits", finished(), on_done=on_done) is None
    store.queue_save("huge", payload(1500), on_done=on_done)
    assert done.wait(30)
    outcomes = {outcome.get("run_id") if isinstance(outcome, dict) else "error":
                (outcome, text, thread) for outcome, text, thread in heard}
    record, text, thread = outcomes["fits"]
    assert thread == "fmedge-results-writer" and record["status"] == "completed"
    assert json.loads(text) == record and store.get_now("fits")["run_id"] == "fits"
    error, text, _ = outcomes["error"]
    assert isinstance(error, StoreFullError) and store.get_now("huge") is None
