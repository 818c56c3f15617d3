"""HTTP API throughput and latency against a bare http.server, plus the serve process's RSS.

    python3 tools/bench/bench_http.py [--duration 5] [--rounds 2] [--connections 8]

Needs `wrk` (Debian/Ubuntu: `apt-get install -y wrk`). Both servers run as child processes
on 127.0.0.1, measured in alternating rounds so drift hits both alike:

- fm-edge: `fmedge.server.serve()` over a fresh data dir (what `fm-edge serve` runs);
- baseline: a bare `ThreadingHTTPServer` handler (HTTP/1.1, keep-alive) answering the same
  status, content type and body bytes fm-edge answered, without doing anything else
  (one send per response and TCP_NODELAY, so it is not slowed by delayed ACKs).

Figures (one JSON line each):
- `GET /health` requests/s and p99 latency (target ratio >= 0.7 of the baseline);
- `POST /run/three-stage?wait=true` (three json_transform stages; per run a start record
  committed without its own fsync and a durable result, group-committed with other runs'
  records) requests/s and p99 (target ratio >= 0.5). Against canned bytes this
  mostly measures the run itself, so a second figure compares it with the same runs
  through the library (`runtime.run`, same concurrency and limits, its own process):
  that ratio is the cost of the HTTP layer;
- the durable ceiling for POST /run: the bare handler plus the least a server that keeps
  each answer on disk before it replies can do in Python threads: one INSERT of the
  answer into a WAL SQLite file with synchronous=FULL, group-committed by a writer thread,
  no run, no checks. Its ratio to the bare server bounds what any such server reaches
  here, fm-edge included; and the same ceiling plus only the run itself (fm-edge's
  executor running the three stages without recording, the record's dict and JSON, then
  that durable INSERT): what a server doing nothing but this run durably reaches;
- RSS of the serve process idle after start (target <= 30 MB) and its peak under load.
  The serve process runs from compiled bytecode (a private pycache prefix, compiled by a
  warm-up process), as an installed fm-edge or the pyz does, even where the environment
  sets PYTHONDONTWRITEBYTECODE: compiling sources on import costs several MB of RSS.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request

from common import ROOT, report

PIPELINE_ID = "three-stage"
RUN_PATH = f"/run/{PIPELINE_ID}?wait=true"
RUN_BODY = '{"x": 1}'

THREE_STAGES = {"id": PIPELINE_ID, "version": "1.0.0", "stages": [
    {"id": "a", "type": "json_transform", "config": {"data": {"x": "{{input.x}}"}}},
    {"id": "b", "type": "json_transform", "depends_on": ["a"],
     "config": {"data": {"y": "{{upstream.a.result.x + 1}}"}}},
    {"id": "c", "type": "json_transform", "depends_on": ["b"],
     "config": {"data": {"z": "{{upstream.b.result.y * 2}}"}}},
]}

SERVE = """
import logging, sys
from fmedge.config import EdgeConfig
from fmedge.runtime import EdgeRuntime
from fmedge.server import serve
logging.basicConfig(level=logging.WARNING)
runtime = EdgeRuntime(EdgeConfig(data_dir=sys.argv[1]))
sys.exit(serve(runtime, "127.0.0.1", 0, on_ready=lambda host, port: print(port, flush=True)))
"""

BARE = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
health, run = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The best a bare handler does: one send per response (buffered wfile, flushed by
    # handle_one_request) and no Nagle delay; the stock two writes would wait ~40 ms on
    # delayed ACKs and flatter fm-edge.
    wbufsize = -1
    disable_nagle_algorithm = True
    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(health)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(run)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""

# The bare handler plus a durable group commit of each answer before replying (see the
# module docstring): the ceiling of a Python server that records what it answers. A
# writer thread commits what the request threads queued meanwhile (measured faster here
# than request threads taking turns to commit for each other).
DURABLE = BARE.replace("""
class Handler(""", """
import os, sqlite3, threading, uuid

db = sqlite3.connect(os.path.join(sys.argv[3], "ceiling.db"), isolation_level=None,
                     check_same_thread=False)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, run TEXT UNIQUE, body TEXT)")
queue, queued = [], threading.Condition()
text = run.decode()

def commit_forever():
    while True:
        with queued:
            while not queue:
                queued.wait()
            group = queue[:]
            del queue[:]
        db.execute("INSERT INTO r (run, body) VALUES " + ",".join(["(?,?)"] * len(group)),
                   [v for _, run_id in group for v in (run_id, text)])
        for done, _ in group:
            done.release()

threading.Thread(target=commit_forever, daemon=True).start()

def save(run_id):
    done = threading.Lock()
    done.acquire()
    with queued:
        queue.append((done, run_id))
        queued.notify()
    done.acquire()             # released once the INSERT holding it committed

class Handler(""").replace("""        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(run)""", """        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        save(uuid.uuid4().hex)
        self.answer(run)""")

# The durable ceiling plus the run itself: fm-edge's executor (record=False) in the
# request thread, the result's record as JSON, stored as above, sent as the answer.
DURABLE_RUN = DURABLE.replace("""
class Handler(""", """
import json, tempfile
from fmedge.cache.results import encode_record
from fmedge.config import EdgeConfig
from fmedge.pipeline import run as engine
from fmedge.pipeline.executor import EdgeExecutor
from fmedge.pipeline.run import drive

engine._MAX_BUSY_S = float("inf")   # never pause into a loop: this server has none

document = json.loads(open(sys.argv[4]).read())
executor = EdgeExecutor(EdgeConfig(data_dir=tempfile.mkdtemp()), record=False,
                        device_id="edge-bench")

def run_and_store(body):
    done, result = drive(executor.execute(pipeline_id=document["id"], document=document,
                                          inputs=json.loads(body)), None, None)
    record = encode_record(result.to_dict())
    save(result.run_id, record)
    return record.encode()

class Handler(""").replace("""def save(run_id):""", """def save(run_id, text=text):""").replace(
    """        queue.append((done, run_id))""", """        queue.append((done, run_id, text))""").replace(
    """                   [v for _, run_id in group for v in (run_id, text)])
        for done, _ in group:""", """                   [v for _, run_id, body in group for v in (run_id, body)])
        for done, _, _ in group:""").replace("""        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        save(uuid.uuid4().hex)
        self.answer(run)""", """        self.answer(run_and_store(
            self.rfile.read(int(self.headers.get("Content-Length", 0)))))""")

LIBRARY = """
import asyncio, sys, time
from fmedge.config import EdgeConfig
from fmedge.runtime import EdgeRuntime

async def main(data_dir, duration, concurrency):
    runtime = EdgeRuntime(EdgeConfig(data_dir=data_dir))
    await runtime.start()
    await runtime.run("%s", %s)           # warm-up: imports, parsed-pipeline cache
    done, end = 0, time.monotonic() + duration

    async def client():
        nonlocal done
        while time.monotonic() < end:
            result = await runtime.run("%s", %s)
            assert result.status == "completed", result.error
            done += 1

    started = time.monotonic()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    print(done / (time.monotonic() - started), flush=True)
    await runtime.stop()

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
""" % (PIPELINE_ID, RUN_BODY, PIPELINE_ID, RUN_BODY)

WARM_UP = "import fmedge.server, fmedge.runtime, fmedge.pipeline.executor, fmedge.sync.manager"

POST_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
""" % RUN_BODY


def child_env(pycache):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def start(code, env, *args, quiet=False):
    proc = subprocess.Popen([sys.executable, "-c", code] + list(args), env=env,
                            stdout=subprocess.PIPE, universal_newlines=True,
                            stderr=subprocess.DEVNULL if quiet else None)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def library_runs_per_s(env, data_dir, duration, concurrency):
    out = subprocess.run([sys.executable, "-c", LIBRARY, data_dir, str(duration),
                          str(concurrency)], env=env, check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return float(out.split()[-1])


def fetch(url, body=None):
    request = urllib.request.Request(url, data=body and body.encode(), method="POST" if body
                                     else "GET", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.read()


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class PeakRss:
    """Samples a process's RSS every 50 ms while a load runs."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def wrk(url, duration, connections, script=None):
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script:
        argv[1:1] = ["-s", script]
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p99, int(errors.group(1)) if errors else 0


def _ms(match):
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def prepare(data_dir):
    sys.path.insert(0, ROOT)
    from fmedge.config import EdgeConfig
    from fmedge.runtime import EdgeRuntime

    runtime = EdgeRuntime(EdgeConfig(data_dir=data_dir))
    runtime.pipelines.store_now(PIPELINE_ID, THREE_STAGES)
    runtime.close()


def measure(name, target, urls, args, script=None, serve_pid=None, library=None):
    """wrk against fm-edge and the baseline in alternating rounds; ``library()`` (runs/s
    through the library) and the durable ceiling (a third URL) join each round when
    given. Returns the peak RSS seen."""
    ours, bare, lib, ceiling = [], [], [], []
    errors = 0
    peak = 0.0
    for _ in range(args.rounds):
        with PeakRss(serve_pid) as sampler:
            rps, p99, failed = wrk(urls[0], args.duration, args.connections, script)
        peak = max(peak, sampler.peak)
        ours.append((rps, p99))
        errors += failed
        bare.append(wrk(urls[1], args.duration, args.connections, script)[:2])
        if len(urls) > 2:
            ceiling.append([wrk(url, args.duration, args.connections, script)[0]
                            for url in urls[2:]])
        if library is not None:
            lib.append(library())
    rps, base_rps = (statistics.median(r for r, _ in runs) for runs in (ours, bare))
    p99, base_p99 = (statistics.median(p for _, p in runs) for runs in (ours, bare))
    report(f"{name}_throughput", rps, "requests/s", baseline=base_rps,
           baseline_name="bare ThreadingHTTPServer, same bytes", target=target,
           connections=args.connections, duration_s=args.duration, rounds=args.rounds,
           non_2xx=errors)
    report(f"{name}_p99_latency", p99, "ms", baseline=base_p99,
           baseline_name="bare ThreadingHTTPServer, same bytes")
    if ceiling:
        durable, with_run = (statistics.median(c[i] for c in ceiling) for i in (0, 1))
        report(f"{name}_durable_ceiling", durable, "requests/s", baseline=base_rps,
               baseline_name="bare ThreadingHTTPServer, same bytes",
               what="bare handler + a group-committed fsync'd SQLite INSERT per answer")
        report(f"{name}_durable_ceiling_with_the_run", with_run, "requests/s",
               baseline=base_rps, baseline_name="bare ThreadingHTTPServer, same bytes",
               what="the durable ceiling + the same run (executor, record=False) and its "
                    "record's JSON as the answer")
        report(f"{name}_vs_durable_ceiling_with_the_run", rps, "requests/s",
               baseline=with_run, baseline_name="the durable ceiling with the run")
    if lib:
        report(f"{name}_vs_library", rps, "requests/s", baseline=statistics.median(lib),
               baseline_name="runtime.run() in-process, same concurrency and limits",
               connections=args.connections)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_http: wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    work = tempfile.mkdtemp(prefix="fmedge-bench-http-")
    serve_proc = bare_proc = durable_proc = run_proc = None
    try:
        env = child_env(os.path.join(work, "pycache"))
        data_dir, lib_dir = os.path.join(work, "edge"), os.path.join(work, "library")
        for folder in (data_dir, lib_dir):
            prepare(folder)
        subprocess.run([sys.executable, "-c", WARM_UP], env=env, check=True)
        library_runs_per_s(env, lib_dir, 0.5, 1)      # compiles what a run imports
        serve_proc, ours = start(SERVE, env, data_dir)
        idle_rss = rss_mb(serve_proc.pid)
        health, run = fetch(ours + "/health"), fetch(ours + RUN_PATH, RUN_BODY)
        assert json.loads(run)["status"] == "completed", run
        warm_rss = rss_mb(serve_proc.pid)
        paths = [os.path.join(work, name) for name in ("health.json", "run.json")]
        for path, data in zip(paths, (health, run)):
            with open(path, "wb") as handle:
                handle.write(data)
        bare_proc, bare = start(BARE, env, *paths, quiet=True)
        durable_proc, durable = start(DURABLE, env, *paths, work, quiet=True)
        document = os.path.join(work, "three-stage.json")
        with open(document, "w") as handle:
            json.dump(THREE_STAGES, handle)
        run_proc, durable_run = start(DURABLE_RUN, env, *paths, work, document, quiet=True)
        script = os.path.join(work, "post.lua")
        with open(script, "w") as handle:
            handle.write(POST_SCRIPT)
        report("serve_idle_rss", idle_rss, "MB", target="<= 30",
               after_first_run_mb=round(warm_rss, 2))
        peak = measure("http_health", ">= 0.7", (ours + "/health", bare + "/health"), args,
                       serve_pid=serve_proc.pid)
        peak = max(peak, measure(
            "http_run_wait", ">= 0.5", (ours + RUN_PATH, bare + RUN_PATH,
                                        durable + RUN_PATH, durable_run + RUN_PATH),
            args, script,
            serve_pid=serve_proc.pid, library=lambda: library_runs_per_s(
                env, lib_dir, args.duration, args.connections)))
        report("serve_rss_under_load", peak, "MB", connections=args.connections)
    finally:
        for proc in (serve_proc, bare_proc, durable_proc, run_proc):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
