"""Sync upload against tools/studio.py on loopback: throughput, memory, link recovery.

    python3 tools/bench/bench_sync.py [--results 100000] [--rss-results 1000000]
                                      [--rounds 4] [--link-trials 3] [--outage-s 4]

Figures (one JSON line each):
- ``sync_upload_throughput``: results/s of ``SyncManager.sync_results()`` draining a
  pending queue (SQLite read, JSON, gzip, POST, mark synced with fsync) against a plain
  urllib3 loop POSTing the same kind of pre-built gzip batches to the same studio
  process, interleaved in rounds so both see the same server and the same growing tables
  (target >= 0.5);
- ``sync_upload_peak_rss_growth``: peak RSS (VmHWM) growth of a child process while it
  uploads ``--rss-results`` pending results, over its RSS once stores and client are open
  (target <= 20 MB: the queue is read a page at a time);
- ``sync_link_return_to_first_upload``: seconds from the chaos proxy's link coming back
  to the first acknowledged upload, with the background loop on real time and the
  default ping_interval (median of ``--link-trials``; bounded by design by the ping
  schedule: 1 s growing to ping_interval while the link is down).

The studio runs as its own process (as a real cloud would), on a fresh database.
"""

import argparse
import asyncio
import gzip
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, report

import urllib3

from fmedge.config import EdgeConfig
from fmedge.runtime import EdgeRuntime
from fmedge.sync.manager import SyncManager

API_KEY = "bench-key-1"
STUDIO = os.path.join(ROOT, "tools", "studio.py")
RESULT = {"pipeline_id": "bench", "status": "completed", "output": {"mean": 2.0, "n": 3},
          "duration_ms": 12.5, "stages": [{"id": "s1", "status": "completed"}]}
BATCH = 500


# -- helpers ----------------------------------------------------------------------------------

class Studio:
    """tools/studio.py in a child process on a free port."""

    def __init__(self, folder):
        command = [sys.executable, STUDIO, "--port", "0", "--db",
                   os.path.join(folder, "studio.db"), "--api-key", API_KEY]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.url = self._read_url()

    def _read_url(self):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                line = self.proc.stdout.readline().decode()
                if "listening on" in line:
                    return line.split("listening on ", 1)[1].split()[0]
        raise SystemExit("studio did not start: %s" % self.proc.stderr.read().decode())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def fill_pending(store, prefix, start, count):
    """Insert pending rows in bulk, shaped exactly as ResultStore.save_now writes them."""
    template = json.dumps(dict(RESULT, run_id="@RUN@"), sort_keys=True)
    now = time.time()
    chunk = 50000
    with store.db.transaction() as conn:
        for first in range(start, start + count, chunk):
            rows = []
            for i in range(first, min(first + chunk, start + count)):
                run_id = "%s-%08d" % (prefix, i)
                payload = template.replace("@RUN@", run_id)
                rows.append((run_id, "bench", "completed", "pending", now, now, "",
                             len(payload), payload))
            conn.executemany(
                "INSERT INTO results (run_id, pipeline_id, status, sync_state, created_at, "
                "updated_at, owner, size, payload) VALUES (?,?,?,?,?,?,?,?,?)", rows)


def edge_runtime(folder, cloud_url, **settings):
    config = EdgeConfig(data_dir=os.path.join(folder, "edge"), cloud_url=cloud_url,
                        api_key=API_KEY, device_id="bench-device", min_free_disk_mb=0,
                        result_store_max_mb=100000, **settings)
    return EdgeRuntime(config)


# -- throughput --------------------------------------------------------------------------------

def plain_batches(prefix, start, count):
    """The baseline's pre-built gzip bodies (built before the clock starts)."""
    bodies = []
    for first in range(start, start + count, BATCH):
        items = [dict(RESULT, run_id="%s-%08d" % (prefix, i))
                 for i in range(first, min(first + BATCH, start + count))]
        data = json.dumps({"results": items}, separators=(",", ":")).encode()
        bodies.append(gzip.compress(data, compresslevel=6, mtime=0))
    return bodies


def plain_upload(pool, url, bodies, tag):
    start = time.perf_counter()
    for index, body in enumerate(bodies):
        response = pool.request("POST", url + "/api/v1/edge/results", body=body, headers={
            "Authorization": "Bearer " + API_KEY, "X-Device-Id": "bench-plain",
            "Content-Type": "application/json", "Content-Encoding": "gzip",
            "Idempotency-Key": "%s-%d" % (tag, index)}, retries=False)
        if response.status != 200:
            raise SystemExit("baseline upload failed: HTTP %d" % response.status)
        json.loads(response.data)
    return time.perf_counter() - start


def bench_throughput(work, studio, total, rounds):
    runtime = edge_runtime(work, studio.url)
    sync = SyncManager.for_runtime(runtime)
    pool = urllib3.PoolManager(maxsize=1)
    per_round = total // rounds
    ours_s = plain_s = 0.0

    async def drain():
        started = time.perf_counter()
        answer = await sync.sync_results()
        if not answer["ok"] or answer["counters"]["uploaded"] != per_round:
            raise SystemExit("sync upload failed: %s" % answer)
        return time.perf_counter() - started

    asyncio.run(sync.sync_results())          # warm-up: opens the client and the stores
    for round_no in range(rounds):
        start = round_no * per_round
        bodies = plain_batches("plain", start, per_round)
        plain_s += plain_upload(pool, studio.url, bodies, "round%d" % round_no)
        fill_pending(runtime.results, "dev", start, per_round)
        ours_s += asyncio.run(drain())
    uploaded = per_round * rounds
    report("sync_upload_throughput", uploaded / ours_s, "results/s",
           baseline=uploaded / plain_s,
           baseline_name="plain urllib3 loop POSTing pre-built gzip batches to the same studio",
           target=">= 0.5", results=uploaded, rounds=rounds, batch=BATCH)
    pool.clear()
    runtime.close()


# -- memory ------------------------------------------------------------------------------------

RSS_CHILD = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from fmedge.config import EdgeConfig
from fmedge.runtime import EdgeRuntime
from fmedge.sync.manager import SyncManager

def status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no %s in /proc/self/status" % field)

config = EdgeConfig(data_dir=sys.argv[2], cloud_url=sys.argv[3], api_key=sys.argv[4],
                    device_id="bench-device", min_free_disk_mb=0, result_store_max_mb=100000)
runtime = EdgeRuntime(config)
sync = SyncManager.for_runtime(runtime)

async def main():
    # Open the client, the stores and the thread pool first: the runtime's fixed cost.
    await sync.sync_pipelines()
    runtime.results.pending_now(1)
    before = status("VmRSS")
    answer = await sync.sync_results()
    return before, answer

before, answer = asyncio.run(main())
print(json.dumps({"before": before, "hwm": status("VmHWM"), "answer": answer}))
"""


def bench_rss(work, studio, count):
    runtime = edge_runtime(work, studio.url)
    fill_pending(runtime.results, "rss", 0, count)
    data_dir = runtime.config.data_dir
    runtime.close()
    script = os.path.join(work, "rss_child.py")
    with open(script, "w") as handle:
        handle.write(RSS_CHILD)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, script, ROOT, data_dir, studio.url, API_KEY],
                          capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["answer"]["counters"]["uploaded"] != count:
        raise SystemExit("rss child did not upload everything: %s" % figures["answer"])
    growth_mb = (figures["hwm"] - figures["before"]) / 1048576.0
    report("sync_upload_peak_rss_growth", growth_mb, "MB", target="<= 20", results=count,
           rss_before_mb=round(figures["before"] / 1048576.0, 1),
           upload_results_per_s=round(count / elapsed, 1))


# -- link recovery -----------------------------------------------------------------------------

def bench_link_return(work, studio, trials, outage_s):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import chaosproxy

    port = int(studio.url.rsplit(":", 1)[1])
    proxy = chaosproxy.ChaosProxy("127.0.0.1", port).start()
    runtime = edge_runtime(work, proxy.url)
    samples = []

    async def trial(number):
        fill_pending(runtime.results, "link%d" % number, 0, 100)
        sync = SyncManager.for_runtime(runtime)      # default ping_interval (30 s)
        proxy.link_down()
        await sync.start()
        await asyncio.sleep(outage_s)                # the outage being measured
        before = sync.uploaded
        proxy.link_up()
        back = time.perf_counter()
        while sync.uploaded == before:
            await asyncio.sleep(0.005)
        samples.append(time.perf_counter() - back)
        await sync.stop()

    for number in range(trials):
        asyncio.run(trial(number))
    report("sync_link_return_to_first_upload", statistics.median(samples), "s",
           samples=[round(s, 3) for s in samples], outage_s=outage_s,
           ping_interval_s=runtime.config.ping_interval,
           note="bounded by the offline ping schedule (1 s growing to ping_interval)")
    runtime.close()
    proxy.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rss-results", type=int, default=1000000)
    parser.add_argument("--link-trials", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as work:
        for name, run in (("throughput", lambda s, w: bench_throughput(
                               w, s, args.results, args.rounds)),
                          ("rss", lambda s, w: bench_rss(w, s, args.rss_results)),
                          ("link", lambda s, w: bench_link_return(
                               w, s, args.link_trials, args.outage_s))):
            folder = os.path.join(work, name)
            os.makedirs(folder)
            studio = Studio(folder)
            try:
                run(studio, folder)
            finally:
                studio.stop()


if __name__ == "__main__":
    main()
