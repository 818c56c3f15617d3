"""`fm-edge start` / `status` / `stop`, from the source tree and from the pyz."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli


def health(url, token=None):
    import json
    from urllib.request import Request, urlopen

    request = Request(url + "/health")
    if token:
        request.add_header("Authorization", "Bearer " + token)
    with urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("pyz") / "fm-edge.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py"), "--output", target],
                   check=True, stdout=subprocess.PIPE)
    return [sys.executable, "-I", target]


@pytest.mark.parametrize("from_pyz", [False, True])
def test_start_status_stop(tmp_path, pyz, from_pyz):
    command = pyz if from_pyz else None
    data = str(tmp_path / "edge")

    def cli(*args):
        return run_cli("--data-dir", data, "--set", "port=0", *args, command=command,
                       cwd=str(tmp_path))

    started = cli("start", "--json")
    assert started.code == 0, started
    url = started.json()["url"]
    try:
        assert health(url)["status"] == "ok"
        status = cli("status", "--json").json()
        assert status["daemon"]["running"] and status["daemon"]["url"] == url
        again = cli("start")
        assert again.code == 4 and "already running" in again.err
        run = run_cli("--data-dir", data, "run", "data-processor", "--input",
                      '{"sensor_data": [1, 2, 3]}', command=command, cwd=str(tmp_path))
        assert run.code == 0, run                   # the CLI runs beside the daemon
    finally:
        stopped = cli("stop", "--json")
    assert stopped.code == 0 and stopped.json()["stopped"] is True
    assert cli("status", "--json").json()["daemon"] == {"running": False}
    assert cli("stop", "--json").json() == {"stopped": False, "running": False}
    assert "serving on" in open(os.path.join(data, "logs", "fm-edge.out")).read()


def test_a_stale_pidfile_does_not_block_a_start(tmp_path):
    data = tmp_path / "edge"
    data.mkdir()
    (data / "fm-edge.pid").write_text('{"pid": 999999, "owner": "x:999999:1", '
                                      '"host": "127.0.0.1", "port": 1}')
    started = run_cli("--data-dir", str(data), "--set", "port=0", "start", "--json")
    assert started.code == 0, started
    run_cli("--data-dir", str(data), "stop")


def test_sigkill_of_the_daemon_leaves_no_run_running(tmp_path):
    data = str(tmp_path / "edge")
    started = run_cli("--data-dir", data, "--set", "port=0", "start", "--json")
    assert started.code == 0, started
    pid = started.json()["pid"]
    from fmedge.cache import ResultStore

    store = ResultStore(os.path.join(data, "results"), min_free_mb=0)
    # A run the daemon owned when it died (its record names the daemon's process).
    from fmedge.process import owner_token

    store.save_now("in-flight", {"pipeline_id": "p", "status": "running"})
    store.db.execute("UPDATE results SET owner=? WHERE run_id='in-flight'",
                     (owner_token(pid),))
    store.close()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while run_cli("--data-dir", data, "status", "--json").json()["daemon"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    restarted = run_cli("--data-dir", data, "--set", "port=0", "start", "--json")
    assert restarted.code == 0, restarted
    run_cli("--data-dir", data, "stop")
    reopened = ResultStore(os.path.join(data, "results"), min_free_mb=0)
    assert reopened.get_now("in-flight")["status"] == "interrupted"
    assert reopened.stats()["running"] == 0
