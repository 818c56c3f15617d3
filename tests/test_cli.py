"""The `fm-edge` command shell: add/list/remove/clear-cache/status, errors, exit codes."""

import json
import os

import pytest

from conftest import run_cli
from fsfixtures import can_mount, tmpfs, unwritable_dir

PIPELINE = {"id": "sensor-stats", "version": "1.0.0", "name": "Sensor stats",
            "stages": [{"id": "log", "type": "logger", "config": {"message": "hi"}}]}


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_version_and_help():
    assert run_cli("--version").out.startswith("fm-edge ")
    helped = run_cli("--help")
    assert helped.code == 0 and "clear-cache" in helped.out and "exit codes" in helped.out
    assert run_cli().code == 2


def test_add_list_remove(cli, tmp_path):
    path = write(tmp_path, "p.json", PIPELINE)
    added = cli("add", path)
    assert added.code == 0 and "added sensor-stats (version 1.0.0" in added.out
    listed = cli("list", "--json").json()
    assert [(e["id"], e["version"], e["source"]) for e in listed] == [
        ("sensor-stats", "1.0.0", "local")]
    assert "sensor-stats" in cli("list").out
    assert cli("remove", "sensor-stats").code == 0
    missing = cli("remove", "sensor-stats")
    assert missing.code == 2 and "not cached" in missing.err
    assert "no pipelines cached" in cli("list").out


def test_add_takes_id_from_flag_then_document_then_file_name(cli, tmp_path):
    no_id = {k: v for k, v in PIPELINE.items() if k != "id"}
    cli("add", write(tmp_path, "from-name.json", no_id))
    cli("add", write(tmp_path, "x.json", no_id), "--id", "from-flag")
    cli("add", "-", "--id", "from-stdin", stdin=json.dumps(no_id))
    ids = sorted(e["id"] for e in cli("list", "--json").json())
    assert ids == ["from-flag", "from-name", "from-stdin"]


@pytest.mark.parametrize("content,words", [
    ("{broken", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"id": "x", "stages": []}), "'stages'"),
    (json.dumps({"id": "../etc", "stages": [{"id": "a"}]}), "invalid pipeline id"),
])
def test_bad_documents_exit_2_with_one_line_and_store_nothing(cli, tmp_path, content, words):
    good = write(tmp_path, "good.json", PIPELINE)
    bad = write(tmp_path, "bad.json", content)
    result = cli("add", good, bad)
    assert result.code == 2, result
    assert words in result.err and result.err.count("\n") == 1
    assert result.err.startswith("fm-edge: error: ")
    assert cli("list", "--json").json() == []          # the good one was not stored either


def test_unreadable_and_missing_files(cli, tmp_path):
    missing = cli("add", str(tmp_path / "nope.json"))
    assert missing.code == 2 and "cannot read" in missing.err and "nope.json" in missing.err
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in cli("add", str(binary)).err
    assert "needs --id" in cli("add", "-", stdin="{}").err


def test_errors_in_json_mode_are_json(cli, tmp_path):
    result = cli("remove", "ghost", "--json")
    assert result.code == 2
    assert json.loads(result.err)["error"]["code"] == "not_found"


def test_status_reports_counts_and_disk(cli, tmp_path, data_dir):
    cli("add", write(tmp_path, "p.json", PIPELINE))
    from fmedge.cache import ResultStore

    store = ResultStore(os.path.join(data_dir, "results"), min_free_mb=0)
    store.save_now("r1", {"pipeline_id": "sensor-stats", "status": "completed"})
    store.save_now("r2", {"pipeline_id": "sensor-stats", "status": "completed"})
    store.mark_synced_now("r2")
    store.close()
    status = cli("status", "--json").json()
    assert status["pipelines"] == 1
    assert (status["results"]["pending"], status["results"]["synced"]) == (1, 1)
    assert status["disk_free_bytes"] > 0 and status["data_dir"] == data_dir
    assert status["device_id"].startswith("edge-")
    assert cli("status", "--json").json()["device_id"] == status["device_id"]  # kept
    human = cli("status").out
    assert "1 pending sync" in human and "pipelines:     1 cached" in human


def test_clear_cache_keeps_pending_unless_asked(cli, tmp_path, data_dir):
    cli("add", write(tmp_path, "p.json", PIPELINE))
    from fmedge.cache import ResultStore

    store = ResultStore(os.path.join(data_dir, "results"), min_free_mb=0)
    for run_id in ("a", "b", "c"):
        store.save_now(run_id, {"pipeline_id": "p", "status": "completed"})
    store.mark_synced_now("a")
    store.close()
    models = os.path.join(data_dir, "models")
    os.makedirs(models)
    open(os.path.join(models, "m.gguf"), "wb").close()
    report = cli("clear-cache", "--yes", "--json").json()
    assert report == {"pipelines": 1, "models": 1, "results": 1, "pending_kept": 2}
    assert cli("status", "--json").json()["results"]["pending"] == 2
    wrong = cli("clear-cache", "--pipelines", "--include-pending", "--yes")
    assert wrong.code == 2 and "only applies with --results" in wrong.err
    report = cli("clear-cache", "--results", "--include-pending", "--yes", "--json").json()
    assert report == {"results": 2}


def test_unknown_set_override_and_bad_flag(cli):
    result = cli("--set", "colour=blue", "status")
    assert result.code == 2 and "unknown --set key 'colour'" in result.err
    assert cli("--set", "nonsense", "status").code == 2
    assert cli("list", "--bogus").code == 2


def test_data_dir_not_writable_is_a_clear_error():
    with unwritable_dir() as root:
        result = run_cli("--data-dir", os.path.join(root, "edge"), "status")
    assert result.code == 2, result
    assert "--data-dir" in result.err and result.err.count("\n") == 1


@pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")
def test_full_disk_is_a_clear_error(tmp_path):
    with tmpfs("64k") as mount:
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as handle:
            try:
                handle.write(b"\0" * 1024 * 1024)
            except OSError:
                pass
        result = run_cli("--data-dir", os.path.join(mount, "edge"), "config", "set",
                         "max_concurrent", "3")
    assert result.code == 2, result
    assert "space" in result.err and result.err.count("\n") == 1


def test_clear_cache_asks_on_a_terminal_and_no_keeps_everything(cli, tmp_path, data_dir):
    import pty
    import subprocess
    import sys

    from conftest import clean_env

    cli("add", write(tmp_path, "p.json", PIPELINE))
    master, slave = pty.openpty()
    os.write(master, b"n\n")
    proc = subprocess.run([sys.executable, "-m", "fmedge", "--data-dir", data_dir,
                           "clear-cache", "--pipelines"], stdin=slave,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=clean_env(), timeout=60)
    os.close(master)
    os.close(slave)
    assert proc.returncode == 2 and "Delete cached pipelines" in proc.stderr
    assert "nothing deleted" in proc.stderr
    assert [e["id"] for e in cli("list", "--json").json()] == ["sensor-stats"]
