"""`fm-edge models`, `doctor`, `export` and `import` from the command line."""

import json

from tiny_model import make_model


def test_models_add_list_rm(cli, tmp_path):
    model = make_model(str(tmp_path), name="tiny.gguf")
    added = cli("models", "add", model, "--name", "tiny", "--json")
    assert added.code == 0, added
    assert len(added.json()["sha256"]) == 64
    listed = cli("models", "list", "--json").json()
    assert [m["name"] for m in listed["models"]] == ["tiny"]
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"hello")
    refused = cli("models", "add", str(bad))
    assert refused.code == 2 and "GGUF" in refused.err
    assert cli("models", "rm", "tiny").code == 0
    assert cli("models", "rm", "tiny").code == 2
    assert cli("models", "list", "--json").json()["models"] == []


def test_doctor_reports_each_check_and_exits_1_when_something_is_wrong(cli, tmp_path):
    model = make_model(str(tmp_path), name="tiny.gguf")
    good = cli("--set", "llm_backend=llamacpp", "--set", f"llm_model={model}", "doctor",
               "--json")
    report = json.loads(good.out)
    names = {check["name"] for check in report["checks"]}
    assert {"python", "data_dir", "disk", "backend", "llama_cpp", "cloud"} <= names
    assert good.code == 0 and report["ok"] is True, report
    missing = cli("--set", "llm_backend=llamacpp", "--set", "llm_model=/nope.gguf", "doctor")
    assert missing.code == 1 and "backend" in missing.out


def test_export_then_import_on_another_device(cli, tmp_path, data_dir):
    from conftest import run_cli

    pipeline = {"id": "shape", "version": "2.0.0",
                "stages": [{"id": "t", "type": "json_transform",
                            "config": {"data": {"twice": "{{input.n * 2}}"}}}]}
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(pipeline))
    assert cli("add", str(path)).code == 0
    bundle = str(tmp_path / "site.tar.gz")
    exported = cli("export", bundle, "--json")
    assert exported.code == 0, exported
    other = str(tmp_path / "other-device")
    imported = run_cli("--data-dir", other, "import", bundle, "--json")
    assert imported.code == 0, imported
    assert [p["status"] for p in imported.json()["pipelines"]] == ["added"]
    ran = run_cli("--data-dir", other, "run", "shape", "--input", '{"n": 21}', "--json")
    assert ran.code == 0 and json.loads(ran.out)["output"]["result"] == {"twice": 42}
    with open(bundle, "r+b") as handle:       # one byte changed: refused, nothing changed
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0xFF]))
    third = str(tmp_path / "third-device")
    refused = run_cli("--data-dir", third, "import", bundle)
    assert refused.code == 2
    assert run_cli("--data-dir", third, "list", "--json").json() == []
