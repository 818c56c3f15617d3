"""SIGKILL of `fm-edge serve` at random moments of a load run (reliability.md §2, T1 and
Appendix B, with the real server instead of writer.py).

Each cycle starts ``python3 -m fmedge --data-dir D --set port=0 serve`` on the same data
dir, waits until it serves (pidfile, then /health), lets two clients POST
/run/data-processor (no wait) for a random moment, and kills the server with SIGKILL, in
some cycles while it is still starting. Every run id answered 202/200 is an acknowledged
run. What must hold, checked with the daemon dead:

- after every kill the results database is intact (``PRAGMA integrity_check``) and holds
  every run acknowledged so far (a 202 means the run's first record is durable);
- at the end, a ResultStore opened after the last kill (its recovery turns runs of dead
  processes into ``interrupted``) has every acknowledged run, none ``running`` or
  ``pending``, each ``completed`` or ``interrupted``; nothing was moved aside as corrupt.
"""

import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from conftest import clean_env

CYCLES = 50
SEED = 0x5EED_F00D
CLIENTS = 2
LOAD_WINDOW_S = (0.1, 0.4)      # how long the clients run before the kill
STARTUP_KILL_EVERY = 8          # about one cycle in 8 kills during startup instead
START_DEADLINE_S = 30.0
BODY = json.dumps({"sensor_data": [1, 2, 3]}).encode("utf-8")
FINAL_STATUSES = {"completed", "interrupted"}


class Load:
    """Client threads posting runs until the server stops answering; keeps what was acked."""

    def __init__(self, port):
        self.port = port
        self.acked = {}            # run_id -> status in the 202/200 answer
        self.unanswered = 0        # requests sent that got no answer (indeterminate)
        self.other = []            # answers that were neither 2xx nor a dead server
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(CLIENTS)]

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def join(self):
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), "a client did not notice the server died"

    def _client(self):
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            try:
                conn.request("POST", "/run/data-processor", body=BODY,
                             headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                body = answer.read()
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.unanswered += 1
                return             # the server is gone
            finally:
                conn.close()
            with self._lock:
                if answer.status in (200, 202):
                    reply = json.loads(body)
                    self.acked[reply["run_id"]] = reply["status"]
                elif answer.status not in (429, 503):   # busy: a client just retries
                    self.other.append((answer.status, body[:300]))


def start_server(data, log):
    return subprocess.Popen(
        [sys.executable, "-m", "fmedge", "--data-dir", data, "--set", "port=0", "serve"],
        env=clean_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True)


def wait_serving(proc, data, log_path):
    """The port once the pidfile names this process and /health answers 200."""
    deadline = time.monotonic() + START_DEADLINE_S
    port = None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"fm-edge serve exited with {proc.returncode}:\n"
                                 + tail(log_path))
        if port is None:
            try:
                with open(os.path.join(data, "fm-edge.pid"), encoding="utf-8") as handle:
                    info = json.load(handle)
                if info.get("pid") == proc.pid:
                    port = info["port"]
            except (OSError, ValueError):
                pass
        if port is not None and health_ok(port):
            return port
        if time.monotonic() > deadline:
            raise AssertionError("fm-edge serve did not answer /health in time:\n"
                                 + tail(log_path))
        time.sleep(0.01)


def health_ok(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)


def tail(path, lines=30):
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


def stored_runs(db_path):
    """{run_id: status} straight from SQLite (no fm-edge recovery), after an integrity check."""
    if not os.path.exists(db_path):
        return {}
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return dict(conn.execute("SELECT run_id, status FROM results"))
    finally:
        conn.close()


def test_sigkill_during_load_loses_no_acknowledged_run(tmp_path):
    rng = random.Random(SEED)
    data = str(tmp_path / "edge")
    db_path = os.path.join(data, "results", "results.db")
    log_path = str(tmp_path / "serve.log")
    acked, ack_status = set(), {}
    unanswered, startup_kills, others = 0, 0, []
    with open(log_path, "ab") as log:
        for cycle in range(CYCLES):
            proc = start_server(data, log)
            try:
                if cycle % STARTUP_KILL_EVERY == STARTUP_KILL_EVERY - 1:
                    # Killed while opening the stores / recovering the last cycle's runs.
                    deadline = time.monotonic() + rng.uniform(0.0, 0.3)
                    while time.monotonic() < deadline and proc.poll() is None:
                        time.sleep(0.005)
                    startup_kills += 1
                    kill(proc)
                else:
                    port = wait_serving(proc, data, log_path)
                    load = Load(port).start()
                    deadline = time.monotonic() + rng.uniform(*LOAD_WINDOW_S)
                    while time.monotonic() < deadline:
                        time.sleep(0.005)
                    kill(proc)
                    load.join()
                    acked.update(load.acked)
                    ack_status.update(load.acked)
                    unanswered += load.unanswered
                    others += load.other
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            stored = stored_runs(db_path)
            lost = acked - set(stored)
            assert not lost, (f"cycle {cycle}: {len(lost)} acknowledged runs are not in the "
                              f"store, e.g. {sorted(lost)[:3]} (acked as "
                              f"{[ack_status[r] for r in sorted(lost)[:3]]})")

    assert not others, f"answers that were neither accepted nor busy: {others[:5]}"
    assert len(acked) >= 10, "the load run acknowledged almost nothing: nothing was tested"

    # The last daemon is dead: opening the store now recovers its unfinished runs.
    from fmedge.cache import ResultStore

    store = ResultStore(os.path.join(data, "results"), min_free_mb=0)
    try:
        assert store.integrity_ok()
        statuses = {}
        for run_id in acked:
            record = store.get_now(run_id)
            assert record is not None, f"acknowledged run {run_id} is missing"
            statuses[run_id] = record["status"]
        assert set(statuses.values()) <= FINAL_STATUSES, statuses
        assert store.stats()["running"] == 0
        leftover = store.db.execute(
            "SELECT run_id, status FROM results WHERE status IN ('running', 'pending')")
        assert leftover == [], leftover
    finally:
        store.close()
    corrupt = [name for name in os.listdir(os.path.join(data, "results"))
               if ".corrupt-" in name]
    assert corrupt == [], f"a database was moved aside as corrupt: {corrupt}"
    interrupted = sum(1 for s in statuses.values() if s == "interrupted")
    print(f"\ncycles={CYCLES} (startup kills {startup_kills}) acked={len(acked)} lost=0 "
          f"interrupted={interrupted} completed={len(acked) - interrupted} "
          f"unanswered={unanswered} ack statuses="
          f"{sorted(set(ack_status.values()))}")
