"""OllamaAdapter over real HTTP against the Ollama stand-in (tools/ollama_standin.py)."""

import asyncio
import json

import pytest

from fmedge.adapters import GenerationResult, OllamaAdapter
from fmedge.adapters.http import BackendBusyError
from fmedge.adapters.ollama import PullProgress
from fmedge.errors import (BackendUnavailableError, BusyError, LLMError,
                           ModelNotFoundError, UsageError)
import peers
from peers import Reply, collect, run, using

# Fixtures (a real stand-in server per test; a port that refuses connections).
standin = peers.standin
refused_url = peers.refused_url


def adapter_for(server, **kwargs):
    kwargs.setdefault("model", "llama3.2")
    return OllamaAdapter(base_url=server.url, **kwargs)


def call(server, fn, **kwargs):
    """Run ``fn(adapter)`` against the stand-in with a fresh adapter."""
    return run(using(adapter_for(server, **kwargs), fn))


def last_body(server, path):
    return server.requests_to(path)[-1].body


# -- generate ---------------------------------------------------------------------------
def test_generate_returns_text_tokens_and_reason(standin):
    standin.script("Hello from the edge")
    result = call(standin, lambda a: a.generate("say hello please", system="be brief",
                                                temperature=0.2, max_tokens=64, seed=7,
                                                stop=["END"]))
    assert isinstance(result, GenerationResult)
    assert result.text == "Hello from the edge"
    assert result.model == "llama3.2"
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == 5  # words of prompt + system, as the stand-in counts
    assert result.completion_tokens == 4
    assert result.raw["done"] is True and "context" not in result.raw
    body = last_body(standin, "/api/generate")
    assert body == {"model": "llama3.2", "stream": False, "prompt": "say hello please",
                    "system": "be brief",
                    "options": {"temperature": 0.2, "num_predict": 64, "stop": ["END"],
                                "seed": 7}}


def test_max_tokens_becomes_num_predict_and_length(standin):
    result = call(standin, lambda a: a.generate("one two", max_tokens=12))
    assert result.text.startswith("You said: one two")
    assert result.completion_tokens == 12
    assert result.finish_reason == "length"


def test_stop_strings_are_sent_and_honoured(standin):
    result = call(standin, lambda a: a.generate("alpha beta gamma", stop=["gamma"]))
    assert result.text == "You said: alpha beta "
    assert result.finish_reason == "stop"


def test_durations_are_converted_from_nanoseconds(standin):
    standin.script(Reply("ok", metrics={"total_duration": 1_234_567_891}))
    result = call(standin, lambda a: a.generate("time me"))
    assert result.duration_ms == pytest.approx(1234.567891)


def test_missing_metrics_and_done_reason_are_fine(standin):
    standin.configure(omit_metrics=True)
    standin.script(Reply("bare answer", omit=("done_reason",)))
    result = call(standin, lambda a: a.generate("no metrics"))
    assert result.text == "bare answer"
    assert (result.prompt_tokens, result.completion_tokens) == (0, 0)
    assert result.finish_reason == "stop"
    assert result.duration_ms >= 0  # measured locally when Ollama sends none
    assert "total_duration" not in result.raw


def test_json_mode_sends_format_json(standin):
    result = call(standin, lambda a: a.generate("give json", json=True))
    assert json.loads(result.text) == {"reply": "You said: give json"}
    assert last_body(standin, "/api/generate")["format"] == "json"


def test_keep_alive_is_passed_through(standin):
    async def three_calls(adapter):
        await adapter.generate("a", max_tokens=2)
        await adapter.chat([{"role": "user", "content": "b"}], max_tokens=2)
        await collect(adapter.stream("c", max_tokens=2))

    call(standin, three_calls, keep_alive="30m")
    bodies = [r.body for r in standin.requests if r.method == "POST"]
    assert [b["keep_alive"] for b in bodies] == ["30m", "30m", "30m"]
    call(standin, lambda a: a.generate("d", max_tokens=2))
    assert "keep_alive" not in last_body(standin, "/api/generate")


def test_model_argument_overrides_the_default(standin):
    result = call(standin, lambda a: a.generate("hi", max_tokens=3, model="qwen2.5:0.5b"))
    assert result.model == "qwen2.5:0.5b"
    assert last_body(standin, "/api/generate")["model"] == "qwen2.5:0.5b"


def test_no_model_at_all_is_a_usage_error(standin):
    with pytest.raises(UsageError, match="llm_model"):
        call(standin, lambda a: a.generate("hi"), model="")


def test_concurrent_generations_each_get_their_own_answer(standin):
    async def many(adapter):
        return await asyncio.gather(*(adapter.generate(f"prompt{i}", max_tokens=3)
                                      for i in range(10)))

    results = call(standin, many, max_connections=3)
    assert [r.text for r in results] == [f"You said: prompt{i}" for i in range(10)]


def test_sequential_calls_reuse_one_connection(standin):
    async def mixed(adapter):
        for prompt in ("a", "b", "c"):
            await adapter.generate(prompt, max_tokens=3)
            await collect(adapter.stream(prompt, max_tokens=3))
        await adapter.list_models()

    call(standin, mixed)
    assert len({r.client_port for r in standin.requests}) == 1


# -- stream -----------------------------------------------------------------------------
def test_stream_yields_the_pieces_in_order(standin):
    standin.script("one two three four")
    pieces = call(standin, lambda a: collect(a.stream("count", max_tokens=50)))
    assert pieces == ["one", " two", " three", " four"]
    body = last_body(standin, "/api/generate")
    assert body["stream"] is True and body["options"]["num_predict"] == 50
    assert standin.requests_to("/api/generate")[-1].outcome == "done"


def test_stream_honours_num_predict(standin):
    pieces = call(standin, lambda a: collect(a.stream("go", max_tokens=40)))
    assert len(pieces) == 40


def test_error_line_mid_stream_raises_retryable_llm_error(standin):
    standin.fail("/api/generate", after=2, error="an error was encountered while running "
                                                 "the model")
    seen = []

    async def consume(adapter):
        async for piece in adapter.stream("boom", max_tokens=20):
            seen.append(piece)

    with pytest.raises(LLMError, match="an error was encountered") as caught:
        call(standin, consume)
    assert caught.value.retryable
    assert len(seen) == 2


def test_error_in_a_non_streamed_generation_is_an_llm_error(standin):
    standin.fail("/api/generate", after=1, error="CUDA out of memory")
    with pytest.raises(LLMError, match="CUDA out of memory") as caught:
        call(standin, lambda a: a.generate("x", max_tokens=5))
    assert caught.value.retryable


def test_connection_dropped_mid_stream_is_an_llm_error(standin):
    standin.fail("/api/generate", after=3, drop=True)
    with pytest.raises(LLMError, match="broke the connection") as caught:
        call(standin, lambda a: collect(a.stream("x", max_tokens=20)))
    assert caught.value.retryable


# -- chat -------------------------------------------------------------------------------
def test_chat_sends_messages_and_reads_the_message(standin):
    standin.script("Paris.")
    messages = [{"role": "system", "content": "answer briefly"},
                {"role": "user", "content": "capital of France?"}]
    result = call(standin, lambda a: a.chat(messages, max_tokens=30, json=False))
    assert result.text == "Paris."
    assert result.completion_tokens == 1
    body = last_body(standin, "/api/chat")
    assert body["messages"] == messages and body["stream"] is False
    assert "format" not in body


def test_chat_json_mode(standin):
    result = call(standin, lambda a: a.chat([{"role": "user", "content": "hi"}], json=True))
    assert json.loads(result.text) == {"reply": "You said: hi"}
    assert last_body(standin, "/api/chat")["format"] == "json"


# -- errors -----------------------------------------------------------------------------
def test_unknown_model_is_model_not_found_with_the_pull_hint(standin):
    for attempt in (lambda a: a.generate("hi", model="mistral"),
                    lambda a: a.chat([{"role": "user", "content": "hi"}], model="mistral"),
                    lambda a: collect(a.stream("hi", model="mistral"))):
        with pytest.raises(ModelNotFoundError) as caught:
            call(standin, attempt)
        assert "'mistral'" in str(caught.value)
        assert "ollama pull mistral" in str(caught.value)
        assert not caught.value.retryable


def test_a_full_queue_answers_busy_and_it_is_retryable(standin):
    standin.configure(max_queue=1, token_delay=0.05)

    async def while_another_generates(adapter):
        first_piece = asyncio.Event()

        async def occupy():
            async for _ in adapter.stream("long", max_tokens=1000):
                first_piece.set()

        occupant = asyncio.create_task(occupy())
        await first_piece.wait()
        try:
            await adapter.generate("second")
        finally:
            occupant.cancel()

    with pytest.raises(BackendBusyError, match="busy") as caught:
        call(standin, while_another_generates)
    assert caught.value.retryable
    assert isinstance(caught.value, LLMError) and isinstance(caught.value, BusyError)
    assert "maximum pending requests exceeded" in str(caught.value)


def test_429_is_busy_too(standin):
    standin.fail("/api/chat", status=429, error="too many requests")
    with pytest.raises(BackendBusyError):
        call(standin, lambda a: a.chat([{"role": "user", "content": "hi"}]))


def test_other_server_errors_are_retryable_llm_errors(standin):
    standin.fail("/api/generate", status=500, error="llama runner process has terminated")
    with pytest.raises(LLMError, match="runner process has terminated") as caught:
        call(standin, lambda a: a.generate("x"))
    assert caught.value.retryable


def test_bad_request_is_not_retryable(standin):
    standin.fail("/api/generate", status=400, error="invalid options")
    with pytest.raises(LLMError, match="invalid options") as caught:
        call(standin, lambda a: a.generate("x"))
    assert not caught.value.retryable


def test_connection_refused_says_ollama_is_not_running(refused_url):
    adapter = OllamaAdapter(base_url=refused_url, model="llama3.2")
    with pytest.raises(BackendUnavailableError) as caught:
        run(using(adapter, lambda a: a.generate("hi")))
    assert f"Ollama is not running at {refused_url}" in str(caught.value)
    assert "ollama serve" in str(caught.value)
    assert caught.value.retryable
    assert run(using(OllamaAdapter(base_url=refused_url), lambda a: a.health())) is False


def test_a_url_that_is_not_ollama_is_not_retryable(standin):
    adapter = OllamaAdapter(base_url=standin.url + "/elsewhere", model="llama3.2")
    with pytest.raises(LLMError, match="has no endpoint") as caught:
        run(using(adapter, lambda a: a.list_models()))
    assert not caught.value.retryable


def test_read_timeout_is_a_retryable_llm_error(standin):
    # The stand-in cannot answer before 1 s (one token), the adapter waits 0.2 s.
    standin.configure(token_delay=1.0)
    with pytest.raises(LLMError, match="read_timeout") as caught:
        call(standin, lambda a: a.generate("slow", max_tokens=3), read_timeout=0.2)
    assert caught.value.retryable


# -- cancellation -----------------------------------------------------------------------
def wait_for_server(server, predicate):
    """Await the stand-in reaching a state (condition variable, 10 s deadline)."""
    return asyncio.to_thread(server.wait_until, predicate, 10.0)


def test_cancelling_a_stream_closes_the_connection(standin):
    standin.configure(token_delay=0.05)

    async def cancel_after_first_piece(adapter):
        first_piece = asyncio.Event()

        async def consume():
            async for _ in adapter.stream("long story", max_tokens=1000):
                first_piece.set()

        task = asyncio.create_task(consume())
        await first_piece.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_for_server(standin, lambda s: s.disconnects == 1)
        # The pool is still healthy afterwards.
        standin.configure(token_delay=0.0)
        return await adapter.generate("again", max_tokens=3)

    result = call(standin, cancel_after_first_piece)
    assert result.text == "You said: again"
    request = standin.requests_to("/api/generate")[0]
    assert request.outcome == "disconnected" and request.pieces < 1000


def test_cancelling_a_non_streamed_generation_closes_the_connection(standin):
    # stream:false sends nothing until the end: the adapter must cut the socket itself.
    standin.configure(token_delay=0.05)

    async def cancel_while_waiting(adapter):
        task = asyncio.create_task(adapter.generate("long essay", max_tokens=1000))
        assert await wait_for_server(standin, lambda s: s.requests_to("/api/generate"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await wait_for_server(standin, lambda s: s.disconnects == 1)

    assert call(standin, cancel_while_waiting)
    assert standin.requests_to("/api/generate")[0].pieces < 1000


def test_leaving_a_stream_early_closes_the_connection(standin):
    standin.configure(token_delay=0.05)

    async def take_two(adapter):
        pieces = adapter.stream("long", max_tokens=1000)
        taken = [await pieces.__anext__(), await pieces.__anext__()]
        await pieces.aclose()
        assert await wait_for_server(standin, lambda s: s.disconnects == 1)
        return taken

    assert call(standin, take_two) == ["You", " said:"]


def test_a_run_timeout_stops_generation(standin):
    standin.configure(token_delay=0.05)

    async def with_timeout(adapter):
        first_piece = asyncio.Event()

        async def run_stage():
            async for _ in adapter.stream("long", max_tokens=1000):
                first_piece.set()

        stage = asyncio.create_task(run_stage())
        await first_piece.wait()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stage, 0)  # what the executor does on a timeout
        return await wait_for_server(standin, lambda s: s.disconnects == 1)

    assert call(standin, with_timeout)


def test_close_stops_requests_and_later_calls_fail(standin):
    adapter = adapter_for(standin)

    async def close_twice(adapter):
        await adapter.close()
        await adapter.close()
        await adapter.generate("hi")

    with pytest.raises(LLMError, match="closed") as caught:
        run(close_twice(adapter))
    assert not caught.value.retryable


# -- server and models ------------------------------------------------------------------
def test_health_version_and_models(standin):
    async def probe(adapter):
        return await adapter.health(), await adapter.version(), await adapter.list_models()

    healthy, version, models = call(standin, probe)
    assert healthy is True and version
    assert models == ["llama3.2:latest", "qwen2.5:0.5b"]


def test_ollama_host_is_used_when_base_url_is_none(standin, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", f" '127.0.0.1:{standin.port}' ")
    for base_url in (None, ""):
        adapter = OllamaAdapter(base_url=base_url, model="llama3.2")
        assert adapter.base_url == standin.url
        assert run(using(adapter, lambda a: a.health())) is True
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0")
    assert OllamaAdapter().base_url == "http://127.0.0.1:11434"


def test_pull_reports_progress_with_and_without_completed(standin):
    seen = []
    status = call(standin, lambda a: a.pull("tinyllama", progress=seen.append))
    assert status == "success"
    assert all(isinstance(p, PullProgress) for p in seen)
    assert seen[0].status == "pulling manifest" and seen[-1].status == "success"
    layer = [p for p in seen if p.digest]
    assert layer[0].total and layer[0].completed is None and layer[0].fraction is None
    completed = [p.completed for p in layer[1:]]
    assert completed == sorted(completed) and completed[-1] == layer[0].total
    assert layer[-1].fraction == 1.0
    assert last_body(standin, "/api/pull") == {"model": "tinyllama", "stream": True}
    assert "tinyllama:latest" in call(standin, lambda a: a.list_models())


def test_pull_accepts_an_async_callback(standin):
    seen = []

    async def note(progress):
        seen.append(progress.status)

    assert call(standin, lambda a: a.pull("phi3", progress=note)) == "success"
    assert seen[0] == "pulling manifest" and seen[-1] == "success"


def test_pull_error_lines_raise(standin):
    standin.fail("/api/pull", after=3, error="max retries exceeded: connection reset")
    with pytest.raises(LLMError, match="max retries exceeded") as caught:
        call(standin, lambda a: a.pull("phi3"))
    assert caught.value.retryable
    standin.fail("/api/pull", after=1, error="pull model manifest: file does not exist")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        call(standin, lambda a: a.pull("no-such-model"))


# -- the stand-in is faithful enough for the official client ----------------------------
def test_official_ollama_client_works_against_the_standin(standin):
    ollama = pytest.importorskip("ollama")
    with ollama.Client(host=standin.url) as client:
        check_official_client(ollama, client)


def check_official_client(ollama, client):
    reply = client.generate(model="llama3.2", prompt="hello", options={"num_predict": 4})
    assert reply.response.startswith("You said: hello") and reply.done_reason == "length"
    assert reply.eval_count == 4 and reply.total_duration > 0
    chat = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert chat.message.content == "You said: hi"
    streamed = [p.response for p in client.generate(model="llama3.2", prompt="x",
                                                    stream=True)]
    assert "".join(streamed) == "You said: x" and streamed[-1] == ""
    assert [m.model for m in client.list().models] == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert client.show("llama3.2").modelinfo["llama.context_length"] == 4096
    assert [m.model for m in client.ps().models] == ["llama3.2:latest"]
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="nope", prompt="x")
    assert caught.value.status_code == 404 and "not found" in caught.value.error
