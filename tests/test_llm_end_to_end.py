"""The 19 local gallery templates, end to end through the real `fm-edge run` command, on
real LLM backends: llama.cpp on the generated tiny GGUF model, and the Ollama stand-in.

The tiny model writes gibberish (and the stand-in echoes the prompt), so the JSON-reading
nodes (critic, selector, improver, synthesizer) take the reference's fallbacks; the
templates must still complete, and the test checks that those fallbacks were taken.

Generation is kept short to keep the suite fast: each template is run from a copy whose
LLM stages get ``llm_settings.max_tokens = SHORT_MAX_TOKENS`` (no gallery stage sets
``max_tokens`` itself, so the stage setting wins over the nodes' 2048-4096 defaults).
The tiny model's token suppression makes every generation exactly that long, which
proves each stage really went through the model.

Nothing here sleeps to wait; the one time bound asserted is the acceptance's "a run
timeout stops generation within 1 s" (see that test).
"""

import asyncio
import copy
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import run_cli  # noqa: E402
from gallery import require_gallery  # noqa: E402
from peers import MODELS, standin  # noqa: E402,F401  (fixture)
from test_gallery import LOCAL_ONLY, example_input  # noqa: E402
from tiny_model import make_model, require, tiny_gguf  # noqa: E402,F401  (fixture)

from fmedge.adapters.factory import create_adapter  # noqa: E402
from fmedge.config import EdgeConfig  # noqa: E402
from fmedge.pipeline.catalog import canonical_type, needs_llm  # noqa: E402
from fmedge.pipeline.executor import EdgeExecutor  # noqa: E402

SHORT_MAX_TOKENS = 8
CLI_DEADLINE_S = 120          # a safety net for a hung child; no assertion depends on it
STANDIN_MODEL = MODELS[0]
BACKENDS = ("llamacpp", "ollama")
# The nodes that read a JSON object from the reply; on gibberish they must fall back.
JSON_NODES = frozenset({"critic", "improver", "selector", "combiner"})


# -- helpers ------------------------------------------------------------------------------

def is_llm_stage(stage):
    return needs_llm(stage.get("component_type") or "")


def with_short_generation(document):
    """A copy of ``document`` whose LLM stages generate SHORT_MAX_TOKENS tokens."""
    short = copy.deepcopy(document)
    for stage in short.get("stages") or []:
        if is_llm_stage(stage):
            stage.setdefault("llm_settings", {})["max_tokens"] = SHORT_MAX_TOKENS
    return short


def backend_settings(backend, request):
    """The `--set` flags that select ``backend`` on a real peer."""
    if backend == "llamacpp":
        path = request.getfixturevalue("tiny_gguf")
        return ["llm_backend=llamacpp", "llm_model=" + path]
    server = request.getfixturevalue("standin")
    return ["llm_backend=ollama", "llm_base_url=" + server.url, "llm_model=" + STANDIN_MODEL]


def run_template(tmp_path, document, settings):
    """`fm-edge run FILE --input JSON --json` in a child process; the parsed result."""
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(document))
    flags = []
    for setting in settings:
        flags += ["--set", setting]
    done = run_cli("--data-dir", str(tmp_path / "edge"), *flags, "run", str(path),
                   "--input", json.dumps(example_input(document)), "--json",
                   timeout=CLI_DEADLINE_S)
    assert done.out.strip(), done
    return done, done.json()


def json_stage_ids(document):
    return {stage["id"] for stage in document["stages"]
            if canonical_type(stage.get("component_type") or "") in JSON_NODES}


def llm_records(document, result):
    """The run's records of the document's LLM stages that ran."""
    llm_ids = {stage["id"] for stage in document["stages"] if is_llm_stage(stage)}
    return {sid: rec for sid, rec in result["stages"].items()
            if sid in llm_ids and rec["status"] != "skipped"}


# -- the 19 templates on each backend -----------------------------------------------------

@pytest.mark.parametrize("name", LOCAL_ONLY)
@pytest.mark.parametrize("backend", BACKENDS)
def test_local_template_completes_through_the_cli(tmp_path, request, backend, name):
    document = with_short_generation(require_gallery()[name])
    done, result = run_template(tmp_path, document, backend_settings(backend, request))

    assert result["status"] == "completed", (result["failed_stage"], result["error"],
                                             done.err[-2000:])
    assert done.code == 0, done
    assert result["output"] is not None
    ran = llm_records(document, result)
    assert ran, "no LLM stage ran"
    for stage_id, record in ran.items():
        # One attempt of exactly SHORT_MAX_TOKENS tokens: every stage asked the backend,
        # and no retry hid a failure.
        assert record["status"] == "success", (stage_id, record["error"])
        assert record["attempts"] == 1, (stage_id, record)
        assert record["usage"]["output_tokens"] == SHORT_MAX_TOKENS, (stage_id, record)
    # Neither backend's text holds a JSON object (gibberish, or the stand-in's echo of
    # the prompt's first words), so each JSON node that ran completed on its fallback.
    for stage_id in json_stage_ids(document) & set(ran):
        assert "stage %s: reply had no JSON object" % stage_id in done.err, (
            stage_id, done.err[-2000:])
    if backend == "ollama":
        generations = request.getfixturevalue("standin").requests_to("/api/generate")
        assert len(generations) == len(ran)
        assert all(r.body["model"] == STANDIN_MODEL for r in generations)
        assert all(r.body["options"]["num_predict"] == SHORT_MAX_TOKENS for r in generations)


# -- a run timeout stops generation -------------------------------------------------------

RUN_TIMEOUT_S = 0.5
RELEASE_BOUND_S = 1.0          # the acceptance: generation stops within 1 s of the timeout
POLL_DEADLINE_S = 60           # only reached when the lock is never released
CALIBRATION_TOKENS = 64
CONTEXT_TOKENS = 1500          # fewer than the ~2000 the factory's 2048-token context allows


def generation_pipeline(max_tokens):
    return {
        "id": "long-generation",
        "name": "long generation",
        "version": "1.0.0",
        "stages": [{"id": "write", "component_type": "generator",
                    "config": {"prompt": "hello world", "max_tokens": max_tokens}}],
    }


@pytest.fixture(scope="module")
def slow_gguf(tmp_path_factory):
    """A model slow enough (dim 512, 4 layers: hundreds of tokens per second, not
    thousands) that the factory's 2048-token context takes seconds to fill, so a 0.5 s
    run timeout surely lands mid-generation."""
    require("llama_cpp")
    return make_model(tmp_path_factory.mktemp("slow-model"), "slow.gguf", dim=512,
                      layers=4, ctx=2048)


async def poll_until_free(adapter):
    deadline = time.monotonic() + POLL_DEADLINE_S
    while adapter.busy:
        assert time.monotonic() < deadline, "the model lock was never released"
        await asyncio.sleep(0.001)
    return time.monotonic()


async def timeout_scenario(config):
    """(warm-up result, timed-out result, seconds from execute() to the lock's release)."""
    executor = EdgeExecutor(config)
    # The factory's adapter for the same config shares the run's model and lock (models
    # live in a process-wide registry), so its `busy` is the run's lock.
    probe = create_adapter(config)
    try:
        # A short run first loads llama_cpp and the model and opens the stores, so the
        # timed run starts its timer right after execute() is called.
        warm = await executor.execute(document=generation_pipeline(CALIBRATION_TOKENS))
        started = time.monotonic()
        result = await executor.execute(document=generation_pipeline(100000),
                                        timeout=RUN_TIMEOUT_S)
        released = await poll_until_free(probe)
        assert probe.loaded, "the probe does not share the run's model"
        return warm, result, released - started
    finally:
        await executor.close()
        await probe.close()


def test_run_timeout_stops_llama_cpp_generation_within_one_second(tmp_path, slow_gguf):
    config = EdgeConfig(data_dir=str(tmp_path / "edge"), llm_backend="llamacpp",
                        llm_model=slow_gguf)
    warm, result, release_s = asyncio.run(timeout_scenario(config))

    assert warm.status == "completed", (warm.failed_stage, warm.error)
    assert result.status == "timeout", (result.status, result.error)
    # The one time bound in this file, from the acceptance (1 s; the lag measured on a
    # busy 2-core machine was 10-30 ms). The interval runs from before execute() (the
    # run's timer starts a little later) to when the lock was seen free, so it can only
    # overstate the real lag after the timeout, never hide it.
    lag_s = release_s - RUN_TIMEOUT_S
    assert lag_s < RELEASE_BOUND_S, "lock held %.3f s after the timeout" % lag_s
    # Proof that generation was stopped, not finished: at the warm-up's speed, the
    # tokens the context allows would have run well past the moment the lock came free.
    warm_stage = warm.stages["write"]
    assert warm_stage.usage.completion_tokens == CALIBRATION_TOKENS
    seconds_per_token = warm_stage.duration_ms / 1000.0 / CALIBRATION_TOKENS
    uncancelled_s = CONTEXT_TOKENS * seconds_per_token
    assert uncancelled_s > release_s, (
        "the model is too fast to show cancellation (%.2f s for %d tokens)"
        % (uncancelled_s, CONTEXT_TOKENS))
