"""EdgeExecutor with LLM stages: timeouts that stop work, retries, cancellation, limits."""

import asyncio

import pytest

from fmedge.config import EdgeConfig
from fmedge.errors import BusyError, ModelNotFoundError
from fmedge.pipeline.executor import EdgeExecutor
from llm_double import ScriptedAdapter
from polling import wait_until


def generator(stage_id="write", depends_on=(), **extra):
    document = {"id": stage_id, "type": "generator", "depends_on": list(depends_on),
                "config": {"prompt": "Write about {{input.topic}}"}}
    document.update(extra)
    return document


def doc(*stages):
    return {"id": "llm-test", "stages": list(stages)}


def make(tmp_path, adapter, **config):
    return EdgeExecutor(EdgeConfig(data_dir=str(tmp_path), **config), llm=adapter)


def test_generator_output_usage_and_settings(tmp_path):
    adapter = ScriptedAdapter()
    executor = make(tmp_path, adapter)
    document = doc(generator(model="tiny-override", llm_settings={"temperature": 0.1}))
    result = asyncio.run(executor.execute(document=document, inputs={"topic": "pumps"}))
    assert result.status == "completed", result.error
    assert result.output["content"].startswith("Scripted reply")
    call = adapter.calls[0]
    assert "pumps" in call.prompt and call.model == "tiny-override"
    assert call.temperature == 0.1
    assert result.usage.total_tokens > 0
    assert result.stages["write"].usage.total_tokens == result.usage.total_tokens


def test_stage_timeout_stops_a_slow_generation(tmp_path):
    adapter = ScriptedAdapter().slow_next(1, seconds=3600)
    executor = make(tmp_path, adapter)
    result = asyncio.run(executor.execute(document=doc(generator(timeout_ms=200)),
                                          inputs={"topic": "x"}))
    assert result.status == "failed"
    assert result.error_type == "TimeoutExecutionError" and "200 ms" in result.error


def test_retries_with_backoff_then_success(tmp_path):
    adapter = ScriptedAdapter().fail_next(2)
    executor = make(tmp_path, adapter)
    stage = generator(retry_config={"max_retries": 2, "initial_delay_ms": 0})
    result = asyncio.run(executor.execute(document=doc(stage), inputs={"topic": "x"}))
    assert result.status == "completed", result.error
    assert result.stages["write"].attempts == 3 and len(adapter.calls) == 3
    assert executor.counters["retries"] == 2


def test_retries_exhausted(tmp_path):
    adapter = ScriptedAdapter().fail_next(5)
    executor = make(tmp_path, adapter)
    stage = generator(retry_config={"max_retries": 2, "initial_delay_ms": 0})
    result = asyncio.run(executor.execute(document=doc(stage), inputs={"topic": "x"}))
    assert result.status == "failed" and result.error_type == "RetryExhaustedError"
    assert "after 3 attempts" in result.error and len(adapter.calls) == 3


def test_timeouts_are_retried_each_attempt_with_its_own_limit(tmp_path):
    adapter = ScriptedAdapter().slow_next(2, seconds=3600)
    executor = make(tmp_path, adapter)
    stage = generator(timeout_ms=150, retry_config={"max_retries": 2, "initial_delay_ms": 0})
    result = asyncio.run(executor.execute(document=doc(stage), inputs={"topic": "x"}))
    assert result.status == "completed" and len(adapter.calls) == 3


def test_non_retryable_errors_fail_at_once(tmp_path):
    adapter = ScriptedAdapter().fail_next(1, ModelNotFoundError("model 'x' not found"))
    executor = make(tmp_path, adapter)
    stage = generator(retry_config={"max_retries": 3, "initial_delay_ms": 0})
    result = asyncio.run(executor.execute(document=doc(stage), inputs={"topic": "x"}))
    assert result.status == "failed" and len(adapter.calls) == 1


def test_empty_reply_is_a_failure_not_a_success(tmp_path):
    adapter = ScriptedAdapter().empty_next(1)
    executor = make(tmp_path, adapter)
    result = asyncio.run(executor.execute(document=doc(generator()), inputs={"topic": "x"}))
    assert result.status == "failed"


def test_run_timeout_stops_the_run_and_is_recorded(tmp_path):
    adapter = ScriptedAdapter().slow_next(1, seconds=3600)
    executor = make(tmp_path, adapter)
    result = asyncio.run(executor.execute(document=doc(generator()), inputs={"topic": "x"},
                                          timeout=0.3))
    assert result.status == "timeout" and "execution_timeout" in result.error
    assert executor.results.get_now(result.run_id)["status"] == "timeout"


def test_cancel_a_running_run(tmp_path):
    adapter = ScriptedAdapter().slow_next(1, seconds=3600)
    executor = make(tmp_path, adapter)

    async def scenario():
        task = asyncio.ensure_future(executor.execute(
            document=doc(generator()), inputs={"topic": "x"}, run_id="run-to-cancel"))
        await wait_until(lambda: adapter.calls)
        assert executor.results.get_now("run-to-cancel")["status"] == "running"
        assert await executor.cancel("run-to-cancel") is True
        return await task

    result = asyncio.run(scenario())
    assert result.status == "cancelled"
    assert executor.results.get_now("run-to-cancel")["status"] == "cancelled"


def test_max_concurrent_queue_and_busy(tmp_path):
    adapter = ScriptedAdapter(delay_s=3600)
    executor = make(tmp_path, adapter, max_concurrent=1, max_queued_runs=1)

    async def scenario():
        first = asyncio.ensure_future(executor.execute(
            document=doc(generator()), inputs={"topic": "1"}, run_id="first"))
        second = asyncio.ensure_future(executor.execute(
            document=doc(generator()), inputs={"topic": "2"}, run_id="second"))
        await wait_until(lambda: executor.running == 1 and executor.queue_depth == 1)
        with pytest.raises(BusyError, match="max_concurrent=1"):
            await executor.execute(document=doc(generator()), inputs={"topic": "3"})
        # Queued, not started, but already on disk: an accepted run is never lost.
        def status(run_id):
            return (executor.results.get_now(run_id) or {}).get("status")

        await wait_until(lambda: status("second") == "pending")
        await executor.cancel("first")
        await wait_until(lambda: status("second") == "running")
        await executor.cancel("second")
        return await first, await second

    first, second = asyncio.run(scenario())
    assert (first.status, second.status) == ("cancelled", "cancelled")
    assert executor.counters["rejected_busy"] == 1
