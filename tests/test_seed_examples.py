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
