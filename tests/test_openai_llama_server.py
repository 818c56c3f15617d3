"""OpenAIAdapter against a real OpenAI-compatible server: llama-cpp-python's own
``python -m llama_cpp.server`` serving the generated tiny GGUF model.

The tiny model's token suppression makes every generation exactly ``max_tokens`` tokens,
and the server honours ``seed``, so lengths and same-seed texts are asserted exactly.
Nothing sleeps to wait: start-up is polled against a deadline.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import clean_env, run_cli  # noqa: E402
from gallery import require_gallery  # noqa: E402
from test_gallery import example_input  # noqa: E402
from tiny_model import require, tiny_gguf  # noqa: E402,F401  (fixture)

from fmedge.adapters import GenerationResult  # noqa: E402
from fmedge.adapters.openai import OpenAIAdapter  # noqa: E402

ALIAS = "tiny"
N_CTX = 256
STARTUP_DEADLINE_S = 60     # a safety net: the server is usually up within a few seconds
STOP_DEADLINE_S = 10
CALL_DEADLINE_S = 60        # a safety net so a broken adapter fails instead of hanging
MAX_TOKENS = 12
SEED = 7
PROMPT = "hello world"
SYSTEM = "the edge model"


# -- the server ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_ready(url):
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_ready(process, url, log_path):
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while not server_ready(url):
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                tail = log.read()[-3000:]
            pytest.fail("llama_cpp.server did not come up (exit code %s):\n%s"
                        % (process.poll(), tail))
        time.sleep(0.05)   # polling interval of the readiness check, not a wait for time


def stop(process):
    process.terminate()
    try:
        process.wait(STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def llama_server(tiny_gguf, tmp_path_factory):
    """The base URL of `python -m llama_cpp.server` serving the tiny model as ALIAS."""
    require("uvicorn")   # the [server] extra
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("llama-server") / "server.log")
    # One thread each: on a shared 2-core machine, two spinning ggml threads are many
    # times slower than one whenever a neighbour holds a core.
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", tiny_gguf,
            "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(N_CTX), "--n_threads", "1", "--n_threads_batch", "1",
            "--verbose", "False"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = "http://127.0.0.1:%d" % port
    try:
        wait_until_ready(process, url, log_path)
        yield url
    finally:
        stop(process)


def call(adapter_options, method, *args, **kwargs):
    """Run one adapter call on a fresh event loop, closing the adapter after."""
    async def scenario():
        adapter = OpenAIAdapter(**adapter_options)
        try:
            result = getattr(adapter, method)(*args, **kwargs)
            if method == "stream":
                return [piece async for piece in result]
            return await result
        finally:
            await adapter.close()

    return asyncio.run(asyncio.wait_for(scenario(), CALL_DEADLINE_S))


# -- the adapter --------------------------------------------------------------------------

def test_list_models_and_health(llama_server):
    options = {"base_url": llama_server, "model": ALIAS}
    assert call(options, "list_models") == [ALIAS]
    assert call(options, "health") is True


def test_generate_returns_exactly_max_tokens_through_the_chat_template(llama_server):
    result = call({"base_url": llama_server, "model": ALIAS}, "generate", PROMPT,
                  system=SYSTEM, max_tokens=MAX_TOKENS, seed=SEED)
    assert isinstance(result, GenerationResult)
    assert result.completion_tokens == MAX_TOKENS
    assert result.finish_reason == "length"
    assert result.prompt_tokens > 3    # the ChatML template wraps "hello world"
    assert result.model == ALIAS
    assert result.text.strip()


def test_chat_with_the_same_messages_and_seed_gives_the_generate_text(llama_server):
    options = {"base_url": llama_server + "/v1", "model": ALIAS}   # the /v1 URL also works
    generated = call(options, "generate", PROMPT, system=SYSTEM, max_tokens=MAX_TOKENS,
                     seed=SEED)
    chatted = call(options, "chat", [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": PROMPT}],
                   max_tokens=MAX_TOKENS, seed=SEED)
    assert chatted.completion_tokens == MAX_TOKENS
    assert chatted.text == generated.text


def test_stream_yields_one_piece_per_token_joining_to_the_generate_text(llama_server):
    options = {"base_url": llama_server, "model": ALIAS}
    pieces = call(options, "stream", PROMPT, system=SYSTEM, max_tokens=MAX_TOKENS,
                  seed=SEED)
    generated = call(options, "generate", PROMPT, system=SYSTEM, max_tokens=MAX_TOKENS,
                     seed=SEED)
    assert len(pieces) == MAX_TOKENS    # the tiny model sends one chunk per token
    assert "".join(pieces) == generated.text


def test_raw_completions_skip_the_chat_template(llama_server):
    options = {"base_url": llama_server, "model": ALIAS, "use_completions": True}
    result = call(options, "generate", PROMPT, max_tokens=MAX_TOKENS, seed=SEED)
    pieces = call(options, "stream", PROMPT, max_tokens=MAX_TOKENS, seed=SEED)
    assert result.completion_tokens == MAX_TOKENS
    assert result.prompt_tokens == 3    # <s> ▁hello ▁world: no template around it
    assert "".join(pieces) == result.text


# -- a pipeline run -----------------------------------------------------------------------

def test_hello_world_runs_through_the_cli_with_the_openai_backend(llama_server, tmp_path):
    document = require_gallery()["hello-world"]
    # A short reply of a known length (the generator's default, 4096 tokens, would just
    # run to the end of the server's 256-token context: the server clamps it).
    document["stages"][0]["llm_settings"] = {"max_tokens": MAX_TOKENS}
    path = tmp_path / "hello-world.json"
    path.write_text(json.dumps(document))
    done = run_cli("--data-dir", str(tmp_path / "edge"), "--set", "llm_backend=openai",
                   "--set", "llm_base_url=" + llama_server, "--set", "llm_model=" + ALIAS,
                   "run", str(path), "--input", json.dumps(example_input(document)),
                   "--json", env=clean_env(), timeout=CALL_DEADLINE_S)
    assert done.code == 0, done
    result = done.json()
    assert result["status"] == "completed", (result["error"], done.err)
    assert result["output"]["content"].strip()
    assert result["output"]["model"] == ALIAS
    usage = result["stages"]["generate"]["usage"]
    assert usage["output_tokens"] == MAX_TOKENS
    assert usage["models"] == {ALIAS: usage["total_tokens"]}
