"""Log set-up: JSON lines, secrets masked, files rotated by size."""

import io
import json
import logging

import pytest

from fmedge import logs


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_and_masked_secrets():
    stream = io.StringIO()
    logs.setup_logging("info", "json", secrets=["sk-very-secret-key"], stream=stream)
    logging.getLogger("fmedge.test").info("calling with key %s", "sk-very-secret-key")
    line = json.loads(stream.getvalue().strip())
    assert line["level"] == "info" and line["logger"] == "fmedge.test"
    assert line["message"] == "calling with key ****" and line["time"].endswith("Z")


def test_text_lines_and_level_filtering():
    stream = io.StringIO()
    logs.setup_logging("warning", "text", stream=stream)
    logging.getLogger("fmedge.test").info("hidden")
    logging.getLogger("fmedge.test").warning("shown")
    assert "hidden" not in stream.getvalue() and "WARNING fmedge.test: shown" in stream.getvalue()


def test_log_file_rotates_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "LOG_MAX_BYTES", 2000)
    path = logs.setup_logging("info", "text", log_dir=str(tmp_path / "logs"),
                              stream=io.StringIO())
    for i in range(200):
        logging.getLogger("fmedge.test").info("line %d %s", i, "x" * 40)
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files[0] == "fm-edge.log" and "fm-edge.log.1" in files
    assert len(files) <= 1 + logs.LOG_BACKUPS
    assert "line 199" in open(path).read()
