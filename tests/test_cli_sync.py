"""`fm-edge sync` from the command line: exit codes a cron job can act on."""

import json
import socket

from conftest import run_cli
from studio_fixture import API_KEY, start_studio


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_result(data_dir, run_id):
    from fmedge.cache import ResultStore

    store = ResultStore(f"{data_dir}/results", min_free_mb=0)
    store.save_now(run_id, {"pipeline_id": "p", "status": "completed", "output": 1})
    store.close()


def test_sync_without_a_cloud_is_a_config_error(cli):
    result = cli("sync")
    assert result.code == 2 and "cloud_url" in result.err + result.out


def test_sync_uploads_then_reports_json(cli, data_dir, tmp_path):
    studio = start_studio(str(tmp_path))
    try:
        cli("config", "set", "cloud_url", studio.url)
        cli("config", "set", "api_key", API_KEY)
        make_result(data_dir, "run-1")
        result = cli("sync", "--json")
        assert result.code == 0, result
        report = json.loads(result.out)
        assert report["exit_code"] == 0
        assert cli("status", "--json").json()["results"]["pending"] == 0
        wrong = cli("--set", "api_key=wrong-key", "sync")
        assert wrong.code == 5
    finally:
        studio.stop()


def test_sync_with_the_cloud_down_exits_3(cli, data_dir):
    cli("config", "set", "cloud_url", f"http://127.0.0.1:{free_port()}")
    cli("config", "set", "api_key", "k")
    make_result(data_dir, "run-1")
    result = cli("sync")
    assert result.code == 3, result
    assert cli("status", "--json").json()["results"]["pending"] == 1
