"""`fm-edge doctor` as a library: every backend answering or not, the llama_cpp probe in a
child process, the cloud check, the data dir, and the human format."""

import json
import os
import sys

import pytest

from fmedge.config import EdgeConfig
from fmedge.doctor import doctor_report, exit_code, format_report, probe_llama_cpp
from fsfixtures import unwritable_dir
from peers import refused_url, start_standin  # noqa: F401  (pytest fixture)
from studio_fixture import API_KEY, start_studio


def by_name(report):
    return {check["name"]: check for check in report["checks"]}


def config_for(tmp_path, **settings):
    settings.setdefault("data_dir", str(tmp_path / "edge"))
    return EdgeConfig(**settings)


def test_ollama_answering_with_its_model_passes(tmp_path):
    standin = start_standin(models=["llama3.2"])
    try:
        report = doctor_report(config_for(tmp_path, llm_backend="ollama",
                                          llm_base_url=standin.url, llm_model="llama3.2"))
    finally:
        standin.stop()
    checks = by_name(report)
    assert report["ok"] is True and exit_code(report) == 0, format_report(report)
    assert "Ollama 0.12.6" in checks["backend"]["detail"]
    assert "llama3.2:latest" in checks["model"]["detail"]
    assert checks["cloud"]["detail"] == "not configured (offline only)"
    assert all("fix" not in check for check in report["checks"])
    json.dumps(report)


def test_ollama_without_the_model_names_the_pull_command(tmp_path):
    standin = start_standin(models=["llama3.2"])
    try:
        report = doctor_report(config_for(tmp_path, llm_backend="ollama",
                                          llm_base_url=standin.url, llm_model="mistral"))
    finally:
        standin.stop()
    model = by_name(report)["model"]
    assert model["ok"] is False and "fm-edge models pull mistral" in model["fix"]
    assert report["ok"] is False and exit_code(report) == 1


def test_ollama_down_fails_with_the_fix(tmp_path, refused_url):
    report = doctor_report(config_for(tmp_path, llm_backend="ollama", llm_base_url=refused_url))
    backend = by_name(report)["backend"]
    assert backend["ok"] is False and refused_url in backend["detail"]
    assert "ollama serve" in backend["fix"]
    lines = format_report(report)
    assert any(line.startswith("FAIL  backend") for line in lines)
    assert any("fix: start Ollama" in line for line in lines)
    assert lines[-1] == "some checks failed"


def test_openai_backend_is_asked_for_its_models(tmp_path, refused_url):
    standin = start_standin(models=["llama3.2"])
    try:
        up = doctor_report(config_for(tmp_path, llm_backend="openai",
                                      llm_base_url=standin.url, llm_model="llama3.2"))
    finally:
        standin.stop()
    assert by_name(up)["backend"]["ok"] and by_name(up)["model"]["ok"], format_report(up)
    down = doctor_report(config_for(tmp_path, llm_backend="openai", llm_base_url=refused_url))
    assert by_name(down)["backend"]["ok"] is False


def test_llamacpp_with_the_tiny_gguf_passes_and_the_probe_finds_llama_cpp(tmp_path):
    from tiny_model import make_model, require
    require("llama_cpp")
    model = make_model(tmp_path, ctx=256)
    report = doctor_report(config_for(tmp_path, llm_backend="llamacpp", llm_model=model))
    checks = by_name(report)
    assert checks["backend"]["ok"] and "GGUF" in checks["backend"]["detail"]
    assert checks["llama_cpp"]["ok"]
    import llama_cpp
    assert llama_cpp.__version__ in checks["llama_cpp"]["detail"]
    assert report["ok"] is True, format_report(report)


def test_llamacpp_with_a_missing_or_broken_model_fails(tmp_path):
    missing = doctor_report(config_for(tmp_path, llm_backend="llamacpp",
                                       llm_model=str(tmp_path / "gone.gguf")))
    backend = by_name(missing)["backend"]
    assert backend["ok"] is False and "fm-edge models add" in backend["fix"]
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    broken = doctor_report(config_for(tmp_path, llm_backend="llamacpp",
                                      llm_model=str(not_gguf)))
    assert "not a GGUF model" in by_name(broken)["backend"]["detail"]


def fake_llama_cpp(tmp_path, body):
    package = tmp_path / "fake" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))


def test_the_probe_survives_a_llama_cpp_that_kills_its_process(tmp_path):
    env = fake_llama_cpp(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    probe = probe_llama_cpp(env=env)
    assert probe["ok"] is False and "signal %d" % 4 in probe["detail"]


def test_the_probe_reports_an_import_error_and_a_missing_interpreter(tmp_path):
    env = fake_llama_cpp(tmp_path, "raise OSError('libllama.so: cannot open shared object')\n")
    probe = probe_llama_cpp(env=env)
    assert probe["ok"] is False and "libllama.so" in probe["detail"]
    gone = probe_llama_cpp(python=str(tmp_path / "no-python"))
    assert gone["ok"] is False and "cannot run" in gone["detail"]


def test_the_cloud_is_pinged_only_when_configured(tmp_path, refused_url):
    studio = start_studio(tmp_path)
    try:
        good = doctor_report(config_for(tmp_path, cloud_url=studio.url, api_key=API_KEY,
                                        llm_backend="llamacpp"))
        wrong = doctor_report(config_for(tmp_path, cloud_url=studio.url, api_key="nope-key",
                                         llm_backend="llamacpp"))
        pings = [r for r in studio.requests if r["path"].endswith("/ping")]
    finally:
        studio.stop()
    assert by_name(good)["cloud"]["ok"] is True and len(pings) == 2
    assert by_name(wrong)["cloud"]["ok"] is False and "api_key" in by_name(wrong)["cloud"]["fix"]
    down = doctor_report(config_for(tmp_path, cloud_url=refused_url, api_key=API_KEY))
    assert by_name(down)["cloud"]["ok"] is False


def test_an_unwritable_data_dir_fails(tmp_path):
    with unwritable_dir() as path:
        if os.access(path, os.W_OK):
            pytest.skip("this user can write anywhere")
        report = doctor_report(config_for(tmp_path, data_dir=path, llm_backend="llamacpp"))
    data_dir = by_name(report)["data_dir"]
    assert data_dir["ok"] is False and "--data-dir" in data_dir["fix"]


def test_python_and_disk_are_reported(tmp_path):
    checks = by_name(doctor_report(config_for(tmp_path, llm_backend="llamacpp")))
    assert checks["python"]["ok"] and sys.executable in checks["python"]["detail"]
    assert checks["disk"]["ok"] and "free" in checks["disk"]["detail"]
    assert checks["urllib3"]["ok"]
