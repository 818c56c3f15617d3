"""sync_once (what `fm-edge sync` runs from cron): exit codes, the report, the
cross-process lock, pins. A real studio on 127.0.0.1 and real processes for the lock."""

import json
import os
import socket
import subprocess
import sys

import pytest

from studio_fixture import API_KEY, REPO, start_studio
from fmedge.config import EdgeConfig
from fmedge.errors import BusyError, NotFoundError
from fmedge.runtime import EdgeRuntime
from fmedge.sync.lock import SyncLock
from fmedge.sync.once import (EXIT_AUTH, EXIT_BUSY, EXIT_OFFLINE, EXIT_OK, EXIT_USAGE,
                              pin_pipeline, sync_once, unpin_pipeline)

GOOD = {"name": "greet", "version": "1", "stages": [{"id": "a", "type": "logger"}]}


@pytest.fixture
def studio(tmp_path):
    server = start_studio(tmp_path)
    yield server
    server.stop()


def device(tmp_path, cloud_url, api_key=API_KEY, **settings):
    return EdgeRuntime(EdgeConfig(data_dir=str(tmp_path / "edge"), cloud_url=cloud_url,
                                  api_key=api_key, **settings))


def produce(rt, count):
    for i in range(count):
        rt.results.save_now("run-%04d" % i, {"pipeline_id": "p", "status": "completed",
                                             "output": i})


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return "http://127.0.0.1:%d" % port   # nothing listens there any more


def test_exit_0_syncs_results_then_pipelines(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    produce(rt, 12)
    studio.store.push_pipeline(json.dumps(GOOD).encode(), "greet")
    report = sync_once(rt)
    assert report.exit_code == EXIT_OK and report.ok and report.outcome == "synced"
    assert report.counters["uploaded"] == 12 and report.counters["pipelines_updated"] == 1
    assert report.pending == 0 and "12 results uploaded" in report.message
    paths = [r["path"].rsplit("/", 1)[-1] for r in studio.requests]
    assert paths.index("results") < paths.index("pipelines")
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["exit_code"] == 0 and as_json["counters"]["uploaded"] == 12
    again = sync_once(rt)
    assert again.exit_code == EXIT_OK and again.counters["uploaded"] == 0
    assert len([r for r in studio.requests if r["path"].endswith("/register")]) == 1
    rt.close()


def test_exit_2_without_cloud_url_names_the_setting(tmp_path):
    rt = device(tmp_path, "")
    report = sync_once(rt)
    assert report.exit_code == EXIT_USAGE and report.outcome == "not_configured"
    assert "fm-edge config set cloud_url" in report.message
    assert report.to_dict()["error_code"] == "not_configured"
    rt.close()


def test_exit_2_for_a_config_problem(tmp_path, studio):
    rt = device(tmp_path, studio.url, ca_bundle=str(tmp_path / "missing.pem"))
    report = sync_once(rt)
    assert report.exit_code == EXIT_USAGE and "ca_bundle" in report.message
    assert studio.requests == []
    rt.close()


def test_exit_3_when_the_cloud_is_unreachable(tmp_path):
    rt = device(tmp_path, closed_port_url())
    produce(rt, 3)
    report = sync_once(rt)
    assert report.exit_code == EXIT_OFFLINE and report.outcome == "offline"
    assert "cannot reach the cloud" in report.message and report.pending == 3
    assert rt.results.stats()["pending"] == 3
    rt.close()


def test_exit_3_when_the_cloud_is_unavailable_with_retry_after(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    produce(rt, 3)
    studio.faults.fail(503, times=1, retry_after=7, path="/results")
    report = sync_once(rt)
    assert report.exit_code == EXIT_OFFLINE and report.retry_after == 7
    assert report.error_code == "cloud_unavailable"
    # Retry-After ends the pass: nothing more was asked of the cloud after the 503.
    assert studio.requests[-1]["status"] == 503
    rt.close()


def test_exit_5_for_a_refused_api_key_after_one_request(tmp_path, studio):
    rt = device(tmp_path, studio.url, api_key="not-the-key")
    produce(rt, 3)
    report = sync_once(rt)
    assert report.exit_code == EXIT_AUTH and report.outcome == "auth_failed"
    assert "config set api_key" in report.message and "not-the-key" not in report.message
    assert len(studio.requests) == 1
    rt.close()


def test_exit_4_while_another_process_holds_the_lock(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    produce(rt, 2)
    holder = hold_lock_in_child(rt.config.data_dir)
    try:
        report = sync_once(rt, wait_lock_s=0.1)
        assert report.exit_code == EXIT_BUSY and report.outcome == "busy"
        assert "process %d" % holder.pid in report.message
        assert studio.requests == []
    finally:
        holder.stdin.close()          # the holder exits when its stdin closes
        holder.wait(timeout=20)
        holder.stdout.close()
        holder.stderr.close()
    assert sync_once(rt, wait_lock_s=0.1).exit_code == EXIT_OK
    rt.close()


def test_a_second_sync_process_exits_4(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    lock = SyncLock(rt.config.data_dir)
    assert lock.acquire()
    try:
        code = ("import sys; sys.path.insert(0, %r)\n"
                "from fmedge.config import EdgeConfig\n"
                "from fmedge.runtime import EdgeRuntime\n"
                "from fmedge.sync.once import sync_once\n"
                "rt = EdgeRuntime(EdgeConfig(data_dir=%r, cloud_url=%r, api_key=%r))\n"
                "sys.exit(sync_once(rt, wait_lock_s=0.2).exit_code)\n"
                % (REPO, rt.config.data_dir, studio.url, API_KEY))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    finally:
        lock.release()
    assert done.returncode == EXIT_BUSY, done.stderr
    assert studio.requests == []
    rt.close()


def hold_lock_in_child(data_dir):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from fmedge.sync.lock import SyncLock\n"
            "lock = SyncLock(%r); assert lock.acquire()\n"
            "print('held', flush=True); sys.stdin.read()\n" % (REPO, data_dir))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = child.stdout.readline().decode()
    assert line.strip() == "held", child.stderr.read().decode()
    return child


def test_the_lock_waits_then_gets_it_when_the_holder_lets_go(tmp_path):
    holder = SyncLock(str(tmp_path))
    assert holder.acquire()
    naps = []

    def nap(seconds):          # the waiter's poll: the holder finishes during the first
        naps.append(seconds)
        holder.release()

    waiter = SyncLock(str(tmp_path), sleep=nap)
    assert waiter.acquire(wait_s=30)
    assert len(naps) == 1 and waiter.held
    waiter.release()


def test_the_lock_gives_up_at_its_deadline_with_a_busy_error(tmp_path):
    holder = SyncLock(str(tmp_path))
    assert holder.acquire()
    now = [0.0]

    def nap(seconds):
        now[0] += seconds

    waiter = SyncLock(str(tmp_path), sleep=nap, monotonic=lambda: now[0])
    assert not waiter.acquire(wait_s=1.0) and now[0] >= 1.0
    with pytest.raises(BusyError, match="another sync is running"):
        with SyncLock(str(tmp_path)):
            pass
    holder.release()
    with SyncLock(str(tmp_path)) as lock:
        assert lock.held


def test_pins_survive_sync_once_and_unpin_catches_up(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    studio.store.push_pipeline(json.dumps(GOOD).encode(), "greet")
    sync_once(rt)
    assert pin_pipeline(rt, "greet") == "1"
    studio.store.push_pipeline(json.dumps(dict(GOOD, version="2")).encode(), "greet")
    report = sync_once(rt)
    assert report.counters["pipelines_pinned"] == 1
    assert rt.pipelines.entry("greet")["version"] == "1"
    assert unpin_pipeline(rt, "greet") and not unpin_pipeline(rt, "greet")
    assert sync_once(rt).counters["pipelines_updated"] == 1
    assert rt.pipelines.entry("greet")["version"] == "2"
    with pytest.raises(NotFoundError, match="fm-edge list"):
        pin_pipeline(rt, "nope")
    rt.close()


def test_the_report_lists_refused_pipelines(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    bad = {"name": "bad", "version": "3", "stages": [{"id": "a", "type": "unknown-type"}]}
    studio.store.push_pipeline(json.dumps(bad).encode(), "bad")
    report = sync_once(rt)
    assert report.exit_code == EXIT_OK and report.counters["pipelines_refused"] == 1
    assert "unknown-type" in report.to_dict()["refused_pipelines"]["bad"]["reason"]
    assert rt.pipelines.entry("bad") is None
    rt.close()


def test_state_file_is_private(tmp_path, studio):
    rt = device(tmp_path, studio.url)
    sync_once(rt)
    path = os.path.join(rt.config.pipeline_cache_dir, "sync_state.json")
    assert os.stat(path).st_mode & 0o077 == 0
    rt.close()
