"""OpenAIAdapter over real HTTP against the stand-in's OpenAI-compatible /v1 endpoints."""

import asyncio
import json

import pytest

from fmedge.adapters import OpenAIAdapter
from fmedge.adapters.http import BackendBusyError
from fmedge.errors import BackendUnavailableError, ConfigError, LLMError, ModelNotFoundError
import peers
from peers import Reply, collect, run, using

# Fixtures (a real stand-in server per test; a port that refuses connections).
standin = peers.standin
refused_url = peers.refused_url


def adapter_for(server, **kwargs):
    kwargs.setdefault("model", "llama3.2")
    return OpenAIAdapter(base_url=server.url + "/v1", **kwargs)


def call(server, fn, **kwargs):
    return run(using(adapter_for(server, **kwargs), fn))


def last(server, path):
    return server.requests_to(path)[-1]


# -- generate and chat ------------------------------------------------------------------
def test_generate_uses_chat_completions_with_system_and_user(standin):
    standin.script("Hello from the edge")
    result = call(standin, lambda a: a.generate("say hello", system="be brief",
                                                temperature=0.1, max_tokens=32, seed=3,
                                                stop=["END"]))
    assert result.text == "Hello from the edge"
    assert result.model == "llama3.2"
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (4, 4)
    assert result.raw["object"] == "chat.completion"
    assert last(standin, "/v1/chat/completions").body == {
        "model": "llama3.2", "stream": False, "temperature": 0.1, "max_tokens": 32,
        "stop": ["END"], "seed": 3,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "say hello"}]}


def test_generate_can_use_raw_completions(standin):
    result = call(standin, lambda a: a.generate("one two", system="sys", max_tokens=9),
                  use_completions=True)
    assert result.text.startswith("You said: sys\n\none two")
    assert result.finish_reason == "length" and result.completion_tokens == 9
    assert last(standin, "/v1/completions").body["prompt"] == "sys\n\none two"


def test_chat_and_json_mode(standin):
    messages = [{"role": "user", "content": "json please"}]
    result = call(standin, lambda a: a.chat(messages, json=True))
    assert json.loads(result.text) == {"reply": "You said: json please"}
    body = last(standin, "/v1/chat/completions").body
    assert body["messages"] == messages
    assert body["response_format"] == {"type": "json_object"}


def test_missing_usage_is_fine(standin):
    standin.configure(omit_metrics=True)
    result = call(standin, lambda a: a.generate("x", max_tokens=3))
    assert (result.prompt_tokens, result.completion_tokens) == (0, 0)


def test_an_empty_model_is_left_out(standin):
    # Single-model servers (llama-server, llama_cpp.server) ignore or omit "model";
    # the stand-in, like Ollama, then answers 400.
    with pytest.raises(LLMError, match="model is required") as caught:
        call(standin, lambda a: a.generate("x"), model="")
    assert "model" not in last(standin, "/v1/chat/completions").body
    assert not caught.value.retryable


# -- streaming (SSE) --------------------------------------------------------------------
def test_stream_reads_sse_chat_chunks_until_done(standin):
    standin.script("one two three")
    pieces = call(standin, lambda a: collect(a.stream("count", max_tokens=20)))
    assert pieces == ["one", " two", " three"]
    request = last(standin, "/v1/chat/completions")
    assert request.body["stream"] is True and request.outcome == "done"


def test_stream_reads_sse_completion_chunks(standin):
    pieces = call(standin, lambda a: collect(a.stream("go", max_tokens=7)),
                  use_completions=True)
    assert len(pieces) == 7 and "".join(pieces).startswith("You said: go")


def test_error_event_mid_stream_raises(standin):
    standin.fail("/v1/chat/completions", after=2, error="the model crashed")
    with pytest.raises(LLMError, match="the model crashed") as caught:
        call(standin, lambda a: collect(a.stream("x", max_tokens=20)))
    assert caught.value.retryable


def test_stream_cut_before_the_end_raises(standin):
    standin.fail("/v1/chat/completions", after=2, drop=True)
    with pytest.raises(LLMError) as caught:
        call(standin, lambda a: collect(a.stream("x", max_tokens=20)))
    assert caught.value.retryable


def test_cancelling_a_stream_closes_the_connection(standin):
    standin.configure(token_delay=0.05)

    async def cancel_after_first_piece(adapter):
        first_piece = asyncio.Event()

        async def consume():
            async for _ in adapter.stream("long", max_tokens=1000):
                first_piece.set()

        task = asyncio.create_task(consume())
        await first_piece.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(standin.wait_until, lambda s: s.disconnects == 1, 10)

    assert call(standin, cancel_after_first_piece)
    assert last(standin, "/v1/chat/completions").pieces < 1000


# -- API key ----------------------------------------------------------------------------
def test_api_key_is_sent_as_bearer_token(standin):
    standin.configure(api_key="sk-local")
    result = call(standin, lambda a: a.generate("x", max_tokens=2), api_key="sk-local")
    assert result.text
    assert last(standin, "/v1/chat/completions").headers["Authorization"] == "Bearer sk-local"
    assert "sk-local" not in repr(adapter_for(standin, api_key="sk-local"))


def test_no_api_key_no_header(standin):
    call(standin, lambda a: a.generate("x", max_tokens=2))
    assert "Authorization" not in last(standin, "/v1/chat/completions").headers


def test_a_refused_api_key_is_not_retryable(standin):
    standin.configure(api_key="sk-right")
    with pytest.raises(LLMError, match="refused the API key") as caught:
        call(standin, lambda a: a.generate("x"), api_key="sk-wrong")
    assert caught.value.code == "auth_failed" and not caught.value.retryable


# -- errors -----------------------------------------------------------------------------
def test_unknown_model_is_model_not_found(standin):
    with pytest.raises(ModelNotFoundError, match="'mistral'") as caught:
        call(standin, lambda a: a.generate("x", model="mistral"))
    assert "ollama pull mistral" in str(caught.value)
    assert not caught.value.retryable
    with pytest.raises(ModelNotFoundError):
        call(standin, lambda a: collect(a.stream("x", model="mistral")))


def test_busy_server_is_retryable(standin):
    for status in (503, 429):
        standin.fail("/v1/chat/completions", status=status, error="server busy")
        with pytest.raises(BackendBusyError) as caught:
            call(standin, lambda a: a.generate("x"))
        assert caught.value.retryable


def test_server_error_is_retryable(standin):
    standin.fail("/v1/completions", status=500, error="internal failure")
    with pytest.raises(LLMError, match="internal failure") as caught:
        call(standin, lambda a: a.generate("x"), use_completions=True)
    assert caught.value.retryable


def test_connection_refused_names_the_url(refused_url):
    adapter = OpenAIAdapter(base_url=refused_url, model="m")
    with pytest.raises(BackendUnavailableError) as caught:
        run(using(adapter, lambda a: a.generate("x")))
    assert f"not running at {refused_url}/v1" in str(caught.value)
    assert caught.value.retryable
    assert run(using(OpenAIAdapter(base_url=refused_url), lambda a: a.health())) is False


def test_a_missing_endpoint_is_not_retryable(standin):
    adapter = OpenAIAdapter(base_url=standin.url + "/openai/v1", model="llama3.2")
    with pytest.raises(LLMError, match="has no endpoint") as caught:
        run(using(adapter, lambda a: a.generate("x")))
    assert not caught.value.retryable


# -- server, models, configuration -----------------------------------------------------
def test_health_and_models(standin):
    async def probe(adapter):
        return await adapter.health(), await adapter.list_models()

    assert call(standin, probe) == (True, ["llama3.2:latest", "qwen2.5:0.5b"])


def test_base_url_gets_v1_only_when_it_has_no_path():
    assert OpenAIAdapter("http://127.0.0.1:8080").base_url == "http://127.0.0.1:8080/v1"
    assert OpenAIAdapter("http://127.0.0.1:8080/v1/").base_url == "http://127.0.0.1:8080/v1"
    assert OpenAIAdapter("http://h:1/openai/v1").base_url == "http://h:1/openai/v1"
    for bad in (None, "", "127.0.0.1:8080", "ftp://h/v1"):
        with pytest.raises(ConfigError, match="llm_base_url"):
            OpenAIAdapter(bad)


def test_scripted_reply_with_finish_reason_length(standin):
    standin.script(Reply("cut short", done_reason="length"))
    result = call(standin, lambda a: a.generate("x"))
    assert result.finish_reason == "length"
