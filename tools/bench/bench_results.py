"""ResultStore write throughput and the cost of get_pending as the queue grows.

    python3 tools/bench/bench_results.py [--writes 300] [--big 1000000]

Figures:
- `ResultStore.save` (async, durable) against raw SQLite single-row commits with the same
  pragmas (WAL, synchronous=FULL) on the same filesystem, interleaved in rounds
  (target >= 0.5 of raw);
- `get_pending(500)` with 1,000,000 pending results against 1,000 (target ratio <= 3).
"""

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time

from common import report

from fmedge.cache import ResultStore

RESULT = {"pipeline_id": "bench", "status": "completed", "output": {"mean": 2.0, "n": 3},
          "duration_ms": 12.5, "stages": [{"id": "s1", "status": "completed"}]}


def raw_writes(path, count):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, run_id TEXT UNIQUE, "
                 "payload TEXT)")
    start = time.perf_counter()
    for i in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO r (run_id, payload) VALUES (?, ?)",
                     (f"raw-{time.time_ns()}-{i}", json.dumps(RESULT)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def store_writes(store, count):
    async def go():
        start = time.perf_counter()
        for i in range(count):
            await store.save(f"st-{time.time_ns()}-{i}", RESULT)
        return count / (time.perf_counter() - start)
    return asyncio.run(go())


def bench_save(work, writes, rounds=5):
    store = ResultStore(os.path.join(work, "store"), min_free_mb=0, max_mb=10000)
    raw_path = os.path.join(work, "raw.db")
    raw, ours = [], []
    for _ in range(rounds):
        raw.append(raw_writes(raw_path, writes))
        ours.append(store_writes(store, writes))
    report("result_save_throughput", statistics.median(ours), "results/s",
           baseline=statistics.median(raw), baseline_name="raw sqlite3 single-row commits",
           target=">= 0.5", writes_per_round=writes, rounds=rounds)
    store.close()


def fill_pending(store, count):
    """Insert ``count`` pending rows in bulk, shaped exactly as save_now writes them."""
    payload = json.dumps(dict(RESULT, run_id="x"), sort_keys=True)
    now = time.time()
    batch = 50000
    with store.db.transaction() as conn:
        for start in range(0, count, batch):
            conn.executemany(
                "INSERT INTO results (run_id, pipeline_id, status, sync_state, created_at, "
                "updated_at, owner, size, payload) VALUES (?,?,?,?,?,?,?,?,?)",
                ((f"run-{i:08d}", "bench", "completed", "pending", now, now, "", len(payload),
                  payload) for i in range(start, min(start + batch, count))))


def time_get_pending(store, repeats=200):
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = store.pending_now(500)
        samples.append(time.perf_counter() - start)
        assert len(rows) == 500
    return statistics.median(samples)


def bench_pending(work, big):
    small_store = ResultStore(os.path.join(work, "small"), min_free_mb=0, max_mb=100000)
    big_store = ResultStore(os.path.join(work, "big"), min_free_mb=0, max_mb=100000)
    fill_pending(small_store, 1000)
    fill_pending(big_store, big)
    small_ms = time_get_pending(small_store) * 1000
    big_ms = time_get_pending(big_store) * 1000
    report("get_pending_500", big_ms, "ms", baseline=small_ms,
           baseline_name="same call with 1,000 pending", target="<= 3", pending=big)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--big", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as work:
        bench_save(work, args.writes)
        bench_pending(work, args.big)


if __name__ == "__main__":
    main()
