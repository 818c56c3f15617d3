"""LlamaCppAdapter on a real llama-cpp-python and the tiny GGUF model (no mocks).

The tiny model's token suppression makes every generation exactly ``max_tokens`` long,
so lengths are asserted exactly. Nothing here sleeps to wait or asserts on time: waits
poll a condition, with a generous deadline only as a safety net.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_model import REPO, tiny_gguf, tiny_gguf_raw  # noqa: E402,F401  (fixtures)
from peers import collect  # noqa: E402

from fmedge.adapters import GenerationResult, LlamaCppAdapter  # noqa: E402
from fmedge.adapters.llamacpp import CONTEXT_MARGIN, LLAMA_CPP_PIN  # noqa: E402
from fmedge.errors import LLMError, ModelNotFoundError  # noqa: E402

SAFETY_DEADLINE_S = 120   # only reached when something is broken
SMALL_CTX = 256


def new_adapter(path, **options):
    # One thread: on a shared 2-core machine, two ggml threads spinning on barriers while
    # a neighbour holds a core made decoding ~8x slower than one thread in measurements.
    options.setdefault("n_threads", 1)
    return LlamaCppAdapter(path, **options)


def run(coro):
    return asyncio.run(coro)


async def wait_until(predicate, what):
    deadline = time.monotonic() + SAFETY_DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting for " + what
        await asyncio.sleep(0.001)


def python_subprocess(code, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code] + list(args), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SAFETY_DEADLINE_S)


# -- importing ---------------------------------------------------------------------------

LAZY_IMPORT_CHECK = """
import sys
import fmedge, fmedge.adapters
from fmedge.adapters import LlamaCppAdapter
LlamaCppAdapter("/nonexistent/model.gguf")
print("imported:", "llama_cpp" in sys.modules)
"""


def test_importing_fmedge_and_creating_the_adapter_does_not_import_llama_cpp():
    done = python_subprocess(LAZY_IMPORT_CHECK)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported: False"


MISSING_LLAMA_CPP = """
import asyncio, sys

class NoLlamaCpp:
    # A meta path finder that makes llama_cpp look uninstalled.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llama_cpp":
            raise ModuleNotFoundError("No module named 'llama_cpp'", name=name)
        return None

sys.meta_path.insert(0, NoLlamaCpp())
from fmedge.adapters import LlamaCppAdapter
from fmedge.errors import BackendUnavailableError
adapter = LlamaCppAdapter(sys.argv[1])
print("health:", asyncio.run(adapter.health()))
try:
    asyncio.run(adapter.generate("hello"))
except BackendUnavailableError as exc:
    print("error:", exc.code, exc.retryable)
    print(exc)
"""


def test_missing_llama_cpp_names_the_interpreter_and_the_install_command(tmp_path):
    done = python_subprocess(MISSING_LLAMA_CPP, str(tmp_path / "model.gguf"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "health: False"
    assert lines[1] == "error: backend_unavailable False"
    message = "\n".join(lines[2:])
    assert sys.executable in message
    assert "%s -m pip install llama-cpp-python==%s" % (sys.executable, LLAMA_CPP_PIN) in message


# -- generation --------------------------------------------------------------------------

def test_generate_returns_exactly_max_tokens_with_counts_and_duration(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            return await adapter.generate("hello world", system="be brief",
                                          max_tokens=37, seed=3)
        finally:
            await adapter.close()

    result = run(scenario())
    assert isinstance(result, GenerationResult)
    assert result.completion_tokens == 37
    assert result.finish_reason == "length"
    assert result.prompt_tokens > 0
    assert result.total_tokens == result.prompt_tokens + 37
    assert result.duration_ms > 0
    assert result.model == os.path.basename(tiny_gguf)
    assert result.text.strip()


def test_generate_on_a_model_without_chat_template_uses_raw_text(tiny_gguf_raw):
    async def scenario():
        adapter = new_adapter(tiny_gguf_raw, n_ctx=SMALL_CTX)
        try:
            plain = await adapter.generate("hello world", max_tokens=12, seed=1)
            with_system = await adapter.generate("hello world", system="the edge model",
                                                 max_tokens=12, seed=1)
            return plain, with_system
        finally:
            await adapter.close()

    plain, with_system = run(scenario())
    assert plain.completion_tokens == with_system.completion_tokens == 12
    assert plain.prompt_tokens == 3   # <s> ▁hello ▁world: no template around it
    assert with_system.prompt_tokens > plain.prompt_tokens


@pytest.mark.parametrize("model_fixture", ["tiny_gguf", "tiny_gguf_raw"])
def test_stream_pieces_join_to_the_generated_text_for_the_same_seed(model_fixture, request):
    path = request.getfixturevalue(model_fixture)

    async def scenario():
        adapter = new_adapter(path, n_ctx=SMALL_CTX)
        try:
            result = await adapter.generate("the edge", max_tokens=25, seed=11)
            pieces = await collect(adapter.stream("the edge", max_tokens=25, seed=11))
            return result, pieces
        finally:
            await adapter.close()

    result, pieces = run(scenario())
    assert "".join(pieces) == result.text
    assert len(pieces) == 25   # one piece per token, as the suppression promises


def test_chat_with_several_turns(tiny_gguf):
    messages = [{"role": "system", "content": "you are the edge"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"},
                {"role": "user", "content": "hello model"}]

    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            first = await adapter.chat(messages, max_tokens=15, seed=5)
            again = await adapter.chat(messages, max_tokens=15, seed=5)
            shorter = await adapter.chat(messages[:2], max_tokens=15, seed=5)
            return first, again, shorter
        finally:
            await adapter.close()

    first, again, shorter = run(scenario())
    assert first.completion_tokens == 15 and first.finish_reason == "length"
    assert first.text == again.text
    assert first.prompt_tokens > shorter.prompt_tokens > 0


def test_json_mode_constrains_the_reply_to_json(tiny_gguf, tiny_gguf_raw):
    async def scenario(path):
        adapter = new_adapter(path, n_ctx=SMALL_CTX)
        try:
            return await adapter.generate("give json", max_tokens=40, seed=2, json=True)
        finally:
            await adapter.close()

    for path in (tiny_gguf, tiny_gguf_raw):
        assert run(scenario(path)).text.lstrip().startswith("{")


def test_health_list_models_and_model_names(tiny_gguf, tmp_path):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        missing = new_adapter(str(tmp_path / "absent.gguf"))
        try:
            stem = os.path.splitext(adapter.model)[0]
            by_stem = await adapter.generate("hello", max_tokens=2, model=stem)
            by_path = await adapter.generate("hello", max_tokens=2,
                                             model=os.path.relpath(tiny_gguf))
            assert by_path.completion_tokens == 2
            with pytest.raises(ModelNotFoundError, match="llama3.2"):
                await adapter.generate("hello", max_tokens=2, model="llama3.2")
            return (await adapter.health(), await missing.health(),
                    await adapter.list_models(), by_stem)
        finally:
            await adapter.close()
            await missing.close()

    healthy, missing_healthy, models, by_stem = run(scenario())
    assert healthy is True and missing_healthy is False
    assert models == [os.path.basename(tiny_gguf)]
    assert by_stem.completion_tokens == 2


# -- context limits ----------------------------------------------------------------------

def test_max_tokens_is_clamped_below_the_context(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            huge = await adapter.generate("hello", max_tokens=100000, seed=1)
            unlimited = await adapter.generate("hello", max_tokens=0, seed=1)
            chat = await adapter.chat([{"role": "user", "content": "hi"}],
                                      max_tokens=100000, seed=1)
            pieces = await collect(adapter.stream("hello", max_tokens=100000, seed=1))
            return (huge, unlimited, chat), pieces
        finally:
            await adapter.close()

    results, pieces = run(scenario())
    for result in results:
        assert result.completion_tokens == SMALL_CTX - result.prompt_tokens - CONTEXT_MARGIN
        assert result.finish_reason == "length"
    assert len(pieces) == results[0].completion_tokens   # streams are clamped alike


def test_a_prompt_longer_than_the_context_is_a_clear_error(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            with pytest.raises(LLMError) as raised:
                await adapter.generate("hello " * 400, max_tokens=10)
            ok = await adapter.generate("hello", max_tokens=3)   # still usable afterwards
            return raised.value, ok
        finally:
            await adapter.close()

    error, ok = run(scenario())
    assert error.code == "context_length_exceeded" and not error.retryable
    assert "n_ctx=%d" % SMALL_CTX in str(error)
    assert ok.completion_tokens == 3


# -- load errors -------------------------------------------------------------------------

def generate_error(path):
    async def scenario():
        adapter = new_adapter(path, n_ctx=SMALL_CTX)
        try:
            with pytest.raises(LLMError) as raised:
                await adapter.generate("hello", max_tokens=2)
            return raised.value
        finally:
            await adapter.close()

    return run(scenario())


def test_a_missing_model_file_is_model_not_found(tiny_gguf, tmp_path):
    path = str(tmp_path / "nowhere" / "model.gguf")
    error = generate_error(path)
    assert isinstance(error, ModelNotFoundError) and not error.retryable
    assert path in str(error) and "fm-edge models add" in str(error)


def test_a_file_that_is_not_gguf_is_a_clear_error(tiny_gguf, tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights\n")
    error = generate_error(str(path))
    assert error.code == "model_invalid" and not error.retryable
    assert str(path) in str(error) and "not a GGUF file" in str(error)


def test_a_truncated_gguf_file_is_a_clear_error(tiny_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(tiny_gguf, "rb") as f:
        path.write_bytes(f.read(5000))
    error = generate_error(str(path))
    assert error.code == "model_invalid" and not error.retryable
    assert str(path) in str(error)


# -- concurrency -------------------------------------------------------------------------

def test_concurrent_calls_from_several_tasks_are_serialized(tiny_gguf):
    async def scenario():
        # Two adapters on the same file share one model: without the shared lock,
        # concurrent calls on one llama.cpp context abort the whole process.
        first = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        second = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            reference = await first.generate("hello world", max_tokens=30, seed=9)
            calls = [(first if i % 2 else second).generate("hello world", max_tokens=30,
                                                           seed=9) for i in range(6)]
            calls += [collect(second.stream("hello world", max_tokens=30, seed=9)),
                      first.chat([{"role": "user", "content": "hi"}], max_tokens=30)]
            return reference, await asyncio.gather(*calls)
        finally:
            await first.close()
            await second.close()

    reference, outcomes = run(scenario())
    *results, pieces, chat = outcomes
    assert [r.text for r in results] == [reference.text] * 6
    assert "".join(pieces) == reference.text
    assert chat.completion_tokens == 30


def test_adapters_on_the_same_file_share_the_model_and_its_lock(tiny_gguf):
    async def scenario():
        first = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        second = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            stream = first.stream("hello", max_tokens=50, seed=1)
            await stream.__anext__()   # the stream holds the lock until it ends
            observed = (second.busy, second.loaded)
            await stream.aclose()
            await wait_until(lambda: not second.busy, "the stream to release the lock")
            return observed
        finally:
            await first.close()
            await second.close()

    assert run(scenario()) == (True, True)


def test_the_event_loop_keeps_running_during_a_generation(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            await adapter.generate("hello", max_tokens=1)   # load first
            task = asyncio.ensure_future(adapter.generate("hello", max_tokens=200))
            ticks = 0
            while not task.done():
                ticks += 1
                await asyncio.sleep(0.001)
            return ticks, task.result()
        finally:
            await adapter.close()

    ticks, result = run(scenario())
    assert ticks > 1   # on the loop's own thread the generation would finish in one step
    assert result.completion_tokens == 200


# -- cancellation ------------------------------------------------------------------------

LONG_CTX = 32768
LONG_MAX_TOKENS = 30000   # minutes of work if cancellation did not stop it


def evaluated_tokens(adapter):
    # White-box: how far llama.cpp got, to show the generation stopped midway.
    return adapter._entry.llm.n_tokens


def test_cancelling_a_generation_stops_it_and_releases_the_lock(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=LONG_CTX)
        try:
            await adapter.generate("hello", max_tokens=1)   # load first
            task = asyncio.ensure_future(adapter.generate("hello", max_tokens=LONG_MAX_TOKENS))
            await wait_until(lambda: adapter.busy, "the generation to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: not adapter.busy, "the worker to stop")
            stopped_at = evaluated_tokens(adapter)
            after = await adapter.generate("hello", max_tokens=4, seed=1)
            return stopped_at, after
        finally:
            await adapter.close()

    stopped_at, after = run(scenario())
    assert stopped_at < LONG_MAX_TOKENS
    assert after.completion_tokens == 4   # the model is still usable


def test_cancelling_a_chat_stops_it(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=LONG_CTX)
        try:
            await adapter.generate("hello", max_tokens=1)
            task = asyncio.ensure_future(adapter.chat([{"role": "user", "content": "hi"}],
                                                      max_tokens=LONG_MAX_TOKENS))
            await wait_until(lambda: adapter.busy, "the chat to start")
            task.cancel()
            await wait_until(lambda: task.done() and not adapter.busy, "the worker to stop")
            return task.cancelled(), evaluated_tokens(adapter)
        finally:
            await adapter.close()

    cancelled, stopped_at = run(scenario())
    assert cancelled and stopped_at < LONG_MAX_TOKENS


def test_a_run_timeout_stops_a_stream(tiny_gguf):
    async def consume(adapter, received):
        async for piece in adapter.stream("hello", max_tokens=LONG_MAX_TOKENS):
            received.append(piece)

    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=LONG_CTX)
        received = []
        try:
            task = asyncio.ensure_future(consume(adapter, received))
            await wait_until(lambda: received, "the first piece")
            task.cancel()   # what asyncio.wait_for does when a stage or run times out
            await wait_until(lambda: task.done() and not adapter.busy, "the worker to stop")
            return evaluated_tokens(adapter)
        finally:
            await adapter.close()

    assert run(scenario()) < LONG_MAX_TOKENS


def test_leaving_a_stream_early_stops_the_generation(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=LONG_CTX)
        try:
            stream = adapter.stream("hello", max_tokens=LONG_MAX_TOKENS)
            async for _ in stream:
                break
            await stream.aclose()
            await wait_until(lambda: not adapter.busy, "the worker to stop")
            return evaluated_tokens(adapter)
        finally:
            await adapter.close()

    assert run(scenario()) < LONG_MAX_TOKENS


# -- idle unload -------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_idle_unload_with_an_injected_clock(tiny_gguf):
    clock = FakeClock()

    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX, idle_unload_s=60, clock=clock)
        try:
            steps = [adapter.loaded]
            await adapter.generate("hello", max_tokens=2)
            steps.append(adapter.loaded)
            steps.append(adapter.unload_idle(now=clock.now + 59))
            steps.append(adapter.loaded)
            clock.now += 60
            steps.append(adapter.unload_idle())
            steps.append(adapter.loaded)
            reloaded = await adapter.generate("hello", max_tokens=2)
            steps.append(adapter.loaded and reloaded.completion_tokens == 2)
            return steps
        finally:
            await adapter.close()

    assert run(scenario()) == [False, True, False, True, True, False, True]


def test_idle_unload_leaves_a_model_in_use_alone(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX, idle_unload_s=1)
        try:
            stream = adapter.stream("hello", max_tokens=50)
            await stream.__anext__()
            unloaded = adapter.unload_idle(now=float("inf"))
            still_loaded = adapter.loaded
            await stream.aclose()
            return unloaded, still_loaded
        finally:
            await adapter.close()

    assert run(scenario()) == (False, True)


def test_the_idle_timer_unloads_the_model_after_use(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX, idle_unload_s=0.05)
        try:
            await adapter.generate("hello", max_tokens=2)
            await wait_until(lambda: not adapter.loaded, "the idle unload")
            return True
        finally:
            await adapter.close()

    assert run(scenario())


def test_close_unloads_and_is_idempotent(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        await adapter.generate("hello", max_tokens=2)
        await adapter.close()
        await adapter.close()
        with pytest.raises(LLMError, match="closed"):
            await adapter.generate("hello", max_tokens=2)
        return adapter.loaded

    assert run(scenario()) is False


def test_generation_result_text_is_printable(tiny_gguf):
    async def scenario():
        adapter = new_adapter(tiny_gguf, n_ctx=SMALL_CTX)
        try:
            return await adapter.generate("hello", max_tokens=50, temperature=1.0, seed=4)
        finally:
            await adapter.close()

    text = run(scenario()).text
    assert all(32 <= ord(c) < 127 for c in text), json.dumps(text)
