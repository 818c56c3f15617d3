"""Sync under faults: a real studio on 127.0.0.1, the chaos proxy in front of it.

After every fault the checker asks the same questions (reliability.md §2.0): is every
result the device produced in the studio exactly once (its results table, checked
against the deliveries ledger), is none lost or left pending on the device, and did
sync converge once the link healed. The schedule runs on a fake clock (``step()``), so
backoff and Retry-After are checked in virtual seconds and nothing waits on real time.
"""

import asyncio
import logging
import os
import random
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clock import FakeClock
from studio_fixture import API_KEY, REPO, start_proxy, start_studio
from fmedge.config import EdgeConfig
from fmedge.runtime import EdgeRuntime
from fmedge.sync.client import CloudClient
from fmedge.sync.manager import SyncManager, SyncStatus
from fmedge.sync.once import sync_once

SIGKILL_CYCLES = 50


@pytest.fixture
def cloud(tmp_path):
    studio = start_studio(tmp_path)
    proxy = start_proxy(studio.server_address[1])
    yield studio, proxy
    proxy.stop()
    studio.stop()


class Edge:
    """A device: its stores, a manager on a fake clock, talking through the proxy."""

    def __init__(self, folder, url, read_timeout=5.0, batch_size=25, **settings):
        self.clock = FakeClock()
        self.runtime = EdgeRuntime(EdgeConfig(data_dir=str(folder / "edge"), cloud_url=url,
                                              api_key=API_KEY, **settings))
        self.client = CloudClient(url, API_KEY, self.runtime.device_id, connect_timeout=2,
                                  read_timeout=read_timeout)
        self.sync = SyncManager.for_runtime(self.runtime, client=self.client,
                                            clock=self.clock, rng=random.Random(11),
                                            batch_size=batch_size)
        self.produced = []

    def produce(self, count):
        start = len(self.produced)
        for i in range(start, start + count):
            run_id = "run-%05d" % i
            self.runtime.results.save_now(run_id, {"pipeline_id": "p", "status": "completed",
                                                   "output": {"run": run_id}})
            self.produced.append(run_id)

    def pending(self):
        return self.runtime.results.stats()["pending"]

    def drive(self, until, max_steps=400, produce_each=0):
        async def go():
            for _ in range(max_steps):
                delay = await self.sync.step()
                if until():
                    return
                self.produce(produce_each)
                self.clock.advance(delay)
            raise AssertionError("sync did not get there in %d steps (status %s, last "
                                 "error %s)" % (max_steps, self.sync.status,
                                                self.sync.last_error))
        asyncio.run(go())

    def close(self):
        self.client.close()
        self.runtime.close()


def check_exactly_once(studio, results, produced):
    """Every produced result in the studio once, with its content; none pending here."""
    rows = studio.store.list_results()
    in_cloud = [row["run_id"] for row in rows]
    assert len(in_cloud) == len(set(in_cloud))
    assert set(in_cloud) == set(produced), "lost: %s, phantom: %s" % (
        sorted(set(produced) - set(in_cloud))[:5], sorted(set(in_cloud) - set(produced))[:5])
    assert all(row["payload"]["output"] == {"run": row["run_id"]} for row in rows)
    stats = results.stats()
    assert (stats["pending"], stats["quarantined"], stats["synced"]) == (0, 0, len(produced))
    delivered = studio.store._rows("SELECT run_id, COUNT(*) AS n FROM deliveries "
                                   "GROUP BY run_id")
    assert {row["run_id"] for row in delivered} == set(produced)
    return sum(row["n"] for row in delivered) - len(produced)     # wire duplicates


# (name, inject, heal, the ack of a committed batch is lost so wire duplicates must show)
FAULTS = [
    ("link_down", lambda s, p: p.link_down(), lambda s, p: p.link_up(), False),
    ("link_cut_mid_request", lambda s, p: p.set(cut_request_after=9000),
     lambda s, p: p.clear(), False),
    ("reply_cut_mid_body", lambda s, p: p.set(cut_after=700), lambda s, p: p.clear(), False),
    ("http_500", lambda s, p: s.faults.fail(500, times=3, path="/results"),
     lambda s, p: None, False),
    ("http_429_retry_after", lambda s, p: s.faults.fail(429, times=2, retry_after=7,
                                                        path="/results"),
     lambda s, p: None, False),
    ("http_503_retry_after", lambda s, p: s.faults.fail(503, times=2, retry_after=3),
     lambda s, p: None, False),
    ("commit_then_drop", lambda s, p: s.faults.drop_after_commit(times=2, path="/results"),
     lambda s, p: None, True),
    ("commit_then_garbage", lambda s, p: s.faults.garbage(times=1, path="/results"),
     lambda s, p: None, True),
    ("proxy_drops_every_reply", lambda s, p: p.set(drop_response=True),
     lambda s, p: p.clear(), False),
    ("blackhole_read_timeout", lambda s, p: p.set(blackhole=True), lambda s, p: p.clear(),
     False),
]


@pytest.mark.parametrize("name,inject,heal,ack_lost", FAULTS, ids=[f[0] for f in FAULTS])
def test_every_result_arrives_exactly_once_after_a_fault(tmp_path, cloud, name, inject,
                                                         heal, ack_lost):
    studio, proxy = cloud
    edge = Edge(tmp_path, proxy.url, read_timeout=0.5 if "blackhole" in name else 5.0)
    try:
        edge.produce(120)
        inject(studio, proxy)
        edge.drive(lambda: edge.sync.failed_attempts >= 1, produce_each=7)
        assert edge.sync.status in (SyncStatus.OFFLINE, SyncStatus.ERROR)
        heal(studio, proxy)
        edge.drive(lambda: edge.pending() == 0 and edge.sync.status is SyncStatus.ONLINE,
                   produce_each=0)
        wire_dups = check_exactly_once(studio, edge.runtime.results, edge.produced)
        if ack_lost:
            assert wire_dups > 0 and edge.sync.duplicate > 0
        assert edge.runtime.results.integrity_ok()
    finally:
        edge.close()


def test_latency_changes_nothing(tmp_path, cloud):
    studio, proxy = cloud
    proxy.set(latency_ms=15)
    edge = Edge(tmp_path, proxy.url, batch_size=100)
    try:
        edge.produce(250)
        edge.drive(lambda: edge.pending() == 0)
        assert check_exactly_once(studio, edge.runtime.results, edge.produced) == 0
        assert edge.sync.failed_attempts == 0
    finally:
        edge.close()


def test_retry_after_is_honoured_for_every_request(tmp_path, cloud):
    studio, proxy = cloud
    edge = Edge(tmp_path, proxy.url)
    seen = []    # (virtual time, path, status) of every request the studio answered

    async def go():
        while edge.pending() or not seen:
            delay = await edge.sync.step()
            seen.extend((edge.clock.now, r["path"], r["status"])
                        for r in studio.requests[len(seen):])
            edge.clock.advance(delay)
    try:
        edge.produce(60)
        studio.faults.fail(429, times=1, retry_after=7, path="/results")
        asyncio.run(go())
        [refused_at] = [at for at, path, status in seen if status == 429]
        later = [at for at, path, status in seen if at > refused_at]
        assert later and min(later) >= refused_at + 7
        check_exactly_once(studio, edge.runtime.results, edge.produced)
    finally:
        edge.close()


def test_backoff_grows_while_down_and_the_link_coming_back_retries_at_once(tmp_path,
                                                                          cloud):
    studio, proxy = cloud
    edge = Edge(tmp_path, proxy.url)
    try:
        edge.produce(40)
        proxy.link_down()
        outage_ends = edge.clock.now + 20 * 60
        edge.drive(lambda: edge.clock.now >= outage_ends, max_steps=1000, produce_each=1)
        assert edge.sync.status is SyncStatus.OFFLINE and edge.pending() > 40
        # Only pings while the link is down, growing to one per 15-30 s: no storm.
        assert 10 <= edge.sync.failed_attempts <= 20 * 60 / 15 + 5
        assert edge.sync.stats()["next_pass_in"] is None    # the next good ping decides
        proxy.link_up()
        back_at = edge.clock.now
        edge.drive(lambda: edge.pending() == 0)
        assert edge.clock.now - back_at <= edge.sync.ping_interval
        check_exactly_once(studio, edge.runtime.results, edge.produced)
    finally:
        edge.close()


def test_a_failing_cloud_is_retried_with_growing_backoff(tmp_path, cloud, caplog):
    studio, proxy = cloud
    edge = Edge(tmp_path, studio.url, ping_interval=120)
    try:
        edge.produce(30)
        studio.faults.fail(500, times=10 ** 6, path="/results")
        outage = edge.clock.now + 1800
        with caplog.at_level(logging.INFO, logger="fmedge.sync"):
            edge.drive(lambda: edge.clock.now >= outage, max_steps=2000)
        posts = [r for r in studio.requests if r["path"].endswith("/results")]
        pings = [r for r in studio.requests if r["path"].endswith("/ping")]
        # 1, 2, 4 ... 300 s with full jitter: about 9 tries to reach the cap, then one per
        # 150 s on average; pings keep their interval and do not trigger passes.
        assert 6 <= len(posts) <= 30
        assert len(pings) <= 1800 / 120 + len(posts) + 2
        assert edge.sync.status is SyncStatus.ERROR and edge.pending() == 30
        failing = [r for r in caplog.records if "failing since" in r.getMessage()]
        assert len(failing) == 1          # one line for the outage, not one per retry
        studio.faults.clear()
        edge.drive(lambda: edge.pending() == 0, max_steps=50)
        check_exactly_once(studio, edge.runtime.results, edge.produced)
    finally:
        edge.close()


# -- SIGKILL at random points of sync passes --------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from fmedge.config import EdgeConfig
    from fmedge.runtime import EdgeRuntime
    from fmedge.sync.manager import SyncManager
    from fmedge.sync.once import sync_once

    data_dir, url, key, mode = sys.argv[2:6]
    runtime = EdgeRuntime(EdgeConfig(data_dir=data_dir, cloud_url=url, api_key=key))
    runtime.results  # open the store before saying ready
    print("ready", flush=True)
    if mode == "once":
        while True:
            print("exit", sync_once(runtime, batch_size=5).exit_code, flush=True)
    else:
        async def forever():
            sync = SyncManager.for_runtime(runtime, batch_size=7)
            while True:
                print("ok", (await sync.sync_now())["ok"], flush=True)
        asyncio.run(forever())
""")


def wait_for_line(proc, word, timeout=20.0):
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                line = proc.stdout.readline().decode()
                if not line:
                    break
                if line.startswith(word):
                    return
    finally:
        selector.close()
    raise AssertionError("child did not print %r: %s" % (word, proc.stderr.read().decode()))


def test_sigkill_at_random_points_of_sync_passes(tmp_path):
    studio = start_studio(tmp_path)   # in this process: only the device gets killed
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    config = EdgeConfig(data_dir=str(tmp_path / "edge"), cloud_url=studio.url,
                        api_key=API_KEY)
    device = EdgeRuntime(config)       # the parent produces results between kills
    rng = random.Random(20240611)
    produced = []
    try:
        for cycle in range(SIGKILL_CYCLES):
            produced += produce_ids(device, 40, len(produced))
            if cycle % 7 == 3:        # sometimes the cloud also loses an answer
                studio.faults.drop_after_commit(times=1, path="/results")
            mode = "manager" if cycle % 2 else "once"
            child = subprocess.Popen([sys.executable, str(script), REPO, config.data_dir,
                                      studio.url, API_KEY, mode],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for_line(child, "ready")
                time.sleep(rng.uniform(0.0, 0.25))   # the fault: a random kill point
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=20)
            finally:
                child.stdout.close()
                child.stderr.close()
            assert child.returncode == -signal.SIGKILL
            assert device.results.integrity_ok()
        studio.faults.clear()
        report = sync_once(device)
        assert report.exit_code == 0, report.to_dict()
        wire_dups = check_exactly_once(studio, device.results, produced)
        print("SIGKILL cycles=%d produced=%d wire_duplicates=%d (absorbed by the studio)"
              % (SIGKILL_CYCLES, len(produced), wire_dups))
    finally:
        device.close()
        studio.stop()


def produce_ids(runtime, count, start):
    ids = ["run-%05d" % i for i in range(start, start + count)]
    for run_id in ids:
        runtime.results.save_now(run_id, {"pipeline_id": "p", "status": "completed",
                                          "output": {"run": run_id}})
    return ids


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX")
def test_a_killed_sync_never_leaves_the_lock_held(tmp_path):
    from fmedge.sync.lock import SyncLock

    code = ("import sys; sys.path.insert(0, %r)\n"
            "from fmedge.sync.lock import SyncLock\n"
            "lock = SyncLock(%r); assert lock.acquire()\n"
            "print('held', flush=True); sys.stdin.read()\n" % (REPO, str(tmp_path)))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(child, "held")
        assert not SyncLock(str(tmp_path)).acquire(0)
        child.kill()
        child.wait(timeout=20)
    finally:
        for stream in (child.stdin, child.stdout, child.stderr):
            stream.close()
    lock = SyncLock(str(tmp_path))
    assert lock.acquire(0)
    lock.release()
