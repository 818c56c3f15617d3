"""The seed document's examples run verbatim with the import root `fmedge`."""

import os

from seed import adapt, example, run_example


def test_edge_config_and_create_runtime(tmp_path):
    code = adapt(example("EdgeConfig"), tmp_path)
    names = run_example(code)
    config, runtime = names["config"], names["runtime"]
    assert config.data_dir == str(tmp_path / "edge")
    assert config.pipeline_cache_dir == str(tmp_path / "pipelines")
    assert config.max_concurrent == 2 and config.llm_backend == "ollama"
    assert runtime.started and os.path.isdir(config.result_store_dir)
    runtime.close()


def test_resource_constraints_config(tmp_path):
    from fmedge import EdgeConfig  # the seed imported it in an earlier example

    names = run_example(adapt(example("Resource Constraints"), tmp_path),
                        {"EdgeConfig": EdgeConfig})
    config = names["config"]
    assert (config.max_concurrent, config.execution_timeout) == (1, 120)
    assert (config.pipeline_cache_size_mb, config.model_cache_size_gb) == (50, 10)


def test_pipeline_cache_example(tmp_path):
    pipeline_config = {"name": "demo", "stages": [{"id": "a", "type": "logger"}]}
    names = run_example(adapt(example("Pipeline Cache"), tmp_path),
                        {"pipeline_config": pipeline_config})
    assert names["pipeline"] == pipeline_config and names["exists"] is True
    assert os.path.exists(tmp_path / "pipelines" / "pipelines.db")


def test_result_store_example(tmp_path):
    result = {"pipeline_id": "demo", "status": "completed", "output": {"x": 1}}
    names = run_example(adapt(example("Result Store"), tmp_path),
                        {"run_id": "run-1", "result": result})
    assert [r["run_id"] for r in names["pending"]] == ["run-1"]
    store = names["store"]
    assert store.get_now("run-1")["sync_state"] == "synced"


def test_ollama_adapter_example_against_the_stand_in(tmp_path):
    from tools.ollama_standin import start_standin

    server = start_standin(models=["llama2"])
    try:
        code = adapt(example("Ollama Adapter"), tmp_path).replace(
            "http://localhost:11434", server.url)
        names = run_example(code)
    finally:
        server.stop()
    response = names["response"]
    assert response.text and response.model.startswith("llama2")
    assert response.completion_tokens > 0


def test_llamacpp_adapter_example_on_the_generated_model(tmp_path):
    from tiny_model import make_model

    model = make_model(str(tmp_path), name="tiny.gguf")
    code = adapt(example("LlamaCpp Adapter"), tmp_path).replace(
        "/models/llama-2-7b.gguf", model)
    names = run_example(code)
    assert names["response"].completion_tokens > 0
    import asyncio

    asyncio.run(names["adapter"].close())     # unload now, not at interpreter exit


def test_model_cache_example_downloads_from_the_cloud(tmp_path, monkeypatch):
    from studio_fixture import API_KEY, start_studio
    from tiny_model import make_model

    studio = start_studio(str(tmp_path))
    try:
        model = make_model(str(tmp_path), name="tiny.gguf")
        studio.store.add_model("llama2", model)
        monkeypatch.setenv("FLOWMASON_CLOUD_URL", studio.url)
        monkeypatch.setenv("FLOWMASON_API_KEY", API_KEY)
        monkeypatch.setenv("FLOWMASON_LLM_BACKEND", "llamacpp")
        monkeypatch.setenv("FLOWMASON_EDGE_DATA_DIR", str(tmp_path / "edge"))
        names = run_example(adapt(example("Model Cache"), tmp_path))
    finally:
        studio.stop()
    path = names["path"]
    assert path == str(tmp_path / "models" / "llama2.gguf")
    assert open(path, "rb").read() == open(model, "rb").read()
