"""The engine's fast paths keep the behaviour of the general ones.

A pipeline is parsed once per identical document, its templates compiled once per stage,
its template-free inputs coerced once, and its quick stages run without tasks; these tests
pin what must not change because of that: per-run values, fresh containers, type-exact
document identity, errors on every run, and timeouts and cancellation of runs whose
stages never wait.
"""

import asyncio

from fmedge.config import EdgeConfig
from fmedge.pipeline.executor import EdgeExecutor
from llm_double import ScriptedAdapter
from polling import wait_until

# One stage of this takes some 20 ms of CPU and never waits.
BUSY_CONDITION = "sum(range(1000000)) > 0"


def make(tmp_path, **kwargs):
    return EdgeExecutor(EdgeConfig(data_dir=str(tmp_path)), **kwargs)


def run(executor, document, inputs=None, **kwargs):
    return asyncio.run(executor.execute(document=document, inputs=inputs or {}, **kwargs))


def stage(stage_id, type_, depends_on=(), **config):
    return {"id": stage_id, "type": type_, "depends_on": list(depends_on), "config": config}


def busy_chain(length):
    """Stages one after the other (one per wave), each busy for a while, none waiting."""
    return {"id": "busy", "stages": [
        stage(f"s{i}", "filter", [f"s{i - 1}"] if i else [], data={},
              condition=BUSY_CONDITION) for i in range(length)]}


def test_compiled_templates_read_each_runs_own_values(tmp_path):
    executor = make(tmp_path)
    document = {"id": "t", "stages": [
        stage("a", "json_transform", data={"x": "{{input.x}}", "text": "x={{input.x}}",
                                           "sum": "{{input.x + 1}}"}),
        stage("b", "json_transform", ["a"], data="{{upstream.a.result}}")]}
    first = run(executor, document, {"x": 1})
    second = run(executor, document, {"x": 41})
    assert first.output["result"] == {"x": 1, "text": "x=1", "sum": 2}
    assert second.output["result"] == {"x": 41, "text": "x=41", "sum": 42}


def test_loop_variables_are_read_per_iteration_by_compiled_templates(tmp_path):
    executor = make(tmp_path)
    document = {"id": "t", "stages": [
        stage("each", "foreach", items="{{input.items}}", loop_stages=["body"]),
        stage("body", "json_transform", ["each"],
              data={"item": "{{context.item}}", "index": "{{context.index}}"})]}
    for items in (["a", "b"], ["c"]):
        result = run(executor, document, {"items": items})
        assert [result.stages[f"body_iter_{i}"].output["result"] for i in range(len(items))] \
            == [{"item": item, "index": i} for i, item in enumerate(items)]


def test_each_run_gets_fresh_copies_of_template_free_inputs(tmp_path):
    executor = make(tmp_path)
    document = {"id": "t", "stages": [
        stage("a", "json_transform", data={"tags": ["x"], "nested": {"n": [1]}})]}
    first = run(executor, document)
    first.output["result"]["tags"].append("changed by a caller")
    first.output["result"]["nested"]["n"].append(2)
    assert run(executor, document).output["result"] == {"tags": ["x"], "nested": {"n": [1]}}
    assert document["stages"][0]["config"]["data"] == {"tags": ["x"], "nested": {"n": [1]}}


def test_a_changed_document_object_is_parsed_again_even_if_it_compares_equal(tmp_path):
    executor = make(tmp_path)
    document = {"id": "t", "stages": [stage("a", "json_transform", data={"v": True})]}
    assert run(executor, document).output["result"] == {"v": True}
    data = document["stages"][0]["config"]["data"]
    for value in (1, 1.0, -0.0, 0.0, "1"):     # True == 1 == 1.0 in Python, not in JSON
        data["v"] = value
        output = run(executor, document).output["result"]["v"]
        assert type(output) is type(value) and repr(output) == repr(value)


def test_a_template_free_input_that_cannot_be_coerced_fails_every_run(tmp_path):
    executor = make(tmp_path)
    document = {"id": "t", "stages": [
        stage("loop", "foreach", items=[1, 2], max_parallel="several", loop_stages=[])]}
    for _ in range(2):
        result = run(executor, document)
        assert result.status == "failed" and result.failed_stage == "loop"
        assert result.error_type == "MappingExecutionError" and "max_parallel" in result.error


def test_a_template_only_json_transform_resolves_its_late_input(tmp_path):
    executor = make(tmp_path)
    document = {"id": "t", "stages": [
        stage("shape", "json_transform", template={"n": "{{input.n}}", "k": "constant"})]}
    assert run(executor, document, {"n": 3}).output == {"n": 3, "k": "constant"}
    assert run(executor, document, {"n": 4}).output == {"n": 4, "k": "constant"}


def test_run_timeout_stops_stages_that_never_wait(tmp_path):
    executor = make(tmp_path, record=False)
    result = run(executor, busy_chain(30), timeout=0.1)
    assert result.status == "timeout" and "execution_timeout" in result.error
    assert len(result.stages) < 30      # stopped between waves, not at the end


def test_timeout_stops_a_long_loop_of_quick_stages(tmp_path):
    executor = make(tmp_path, record=False)
    document = {"id": "t", "stages": [
        stage("each", "foreach", items=list(range(30)), loop_stages=["body"]),
        stage("body", "filter", ["each"], data={}, condition=BUSY_CONDITION)]}
    result = run(executor, document, timeout=0.1)
    assert result.status == "timeout"
    assert "body_iter_29" not in result.stages


def test_cancel_a_run_whose_stages_never_wait(tmp_path):
    executor = make(tmp_path)

    async def scenario():
        task = asyncio.ensure_future(executor.execute(
            document=busy_chain(30), inputs={}, run_id="busy-run"))
        await wait_until(lambda: executor._active.get("busy-run") is not None)
        assert await executor.cancel("busy-run") is True
        return await task

    result = asyncio.run(scenario())
    assert result.status == "cancelled" and len(result.stages) < 30
    assert executor.results.get_now("busy-run")["status"] == "cancelled"


def test_a_wave_waits_for_its_waiting_stages_before_failing(tmp_path):
    """A quick stage that fails does not cut short a stage of its wave that waits; the
    first failure in declaration order ends the run, as when every stage was a task."""
    adapter = ScriptedAdapter().slow_next(1, seconds=3600)
    executor = make(tmp_path, llm=adapter, record=False)
    document = {"id": "t", "stages": [
        {"id": "write", "type": "generator", "timeout_ms": 200,
         "config": {"prompt": "about {{input.topic}}"}},
        stage("bad", "json_transform", data="{{input.missing}}"),
        stage("good", "json_transform", data={"ok": True})]}
    result = run(executor, document, {"topic": "pumps"})
    assert result.status == "failed" and result.failed_stage == "write"
    assert result.error_type == "TimeoutExecutionError"
    assert result.stages["bad"].status == "failed"
    assert result.stages["good"].status == "success" and adapter.calls


def test_quick_stages_of_a_wave_run_while_another_waits(tmp_path):
    adapter = ScriptedAdapter()
    executor = make(tmp_path, llm=adapter, record=False)
    document = {"id": "t", "stages": [
        {"id": "write", "type": "generator", "config": {"prompt": "about {{input.topic}}"}},
        stage("quick", "json_transform", data={"topic": "{{input.topic}}"}),
        stage("both", "json_transform", ["write", "quick"],
              data={"text": "{{upstream.write.content}}",
                    "topic": "{{upstream.quick.result.topic}}"})]}
    result = run(executor, document, {"topic": "pumps"})
    assert result.status == "completed", result.error
    assert result.output["result"]["topic"] == "pumps"
    assert result.output["result"]["text"].startswith("Scripted reply")


def test_a_subpipeline_time_limit_stops_a_child_whose_stages_never_wait(tmp_path):
    executor = make(tmp_path)
    executor.pipelines.store_now("busy", busy_chain(30))
    parent = {"id": "parent", "stages": [
        stage("call", "subpipeline", pipeline_id="busy", timeout_ms=100)]}
    result = run(executor, parent)
    assert result.status == "failed" and result.failed_stage == "call"
    assert result.error_type == "TimeoutExecutionError" and "100 ms" in result.error


# -- what a run writes --------------------------------------------------------------------

def statuses_written(store):
    """From now on, every status written to the store's results table, in order (a
    trigger on the store's own connection, which its writer uses); returns their reader."""
    store.db.conn.executescript("""
        CREATE TEMP TABLE written (status TEXT);
        CREATE TEMP TRIGGER on_insert AFTER INSERT ON main.results
            BEGIN INSERT INTO written VALUES (NEW.status); END;
        CREATE TEMP TRIGGER on_update AFTER UPDATE ON main.results
            BEGIN INSERT INTO written VALUES (NEW.status); END;""")
    return lambda: [status for status, in store.db.execute("SELECT status FROM written")]


QUICK = {"id": "quick", "stages": [stage("a", "json_transform", data={"x": "{{input.x}}"})]}


def test_a_run_that_never_waits_writes_only_its_final_record(tmp_path):
    executor = make(tmp_path)
    run(executor, QUICK, {"x": 0})          # opens the store and starts its writer
    store = executor.results
    written = statuses_written(store)
    result = run(executor, QUICK, {"x": 1})
    assert result.status == "completed"
    # No `running` record first: nothing could see the run between its start and end.
    assert written() == ["completed"]


def test_on_recorded_is_told_by_the_writer_once_the_record_is_stored(tmp_path):
    import json
    import threading
    import time

    executor = make(tmp_path)
    heard = []

    def recorded(result, payload):
        # Stored already: what a caller is told can be read back at once.
        heard.append((result, payload, threading.current_thread().name,
                      executor.results.get_now(result.run_id)))

    result = run(executor, QUICK, {"x": 7}, on_recorded=recorded)
    deadline = time.monotonic() + 30
    while not heard:
        assert time.monotonic() < deadline, "on_recorded was never called"
        time.sleep(0.001)
    told, payload, thread, stored = heard[0]
    assert told is result and thread == "fmedge-results-writer"
    assert json.loads(payload) == result.to_dict()
    assert stored["output"]["result"] == {"x": 7} and stored["sync_state"] == "pending"


def test_on_recorded_hears_of_a_record_that_could_not_be_written(tmp_path):
    executor = make(tmp_path)
    run(executor, QUICK, {"x": 0})
    executor.results.close()               # every save now fails
    heard = []
    result = run(executor, QUICK, {"x": 1},
                 on_recorded=lambda result, payload: heard.append(payload))
    assert heard == [None]                 # said at once: nothing was queued
    assert "closed" in result.record_error and result.status == "completed"


# -- runs driven from a thread without an event loop (the HTTP API's workers) --------------

class LoopThread:
    """A running event loop in its own thread, as the server's runtime loop."""

    def __enter__(self):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()
        return self.loop

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def drive_here(executor, loop, document, inputs=None):
    """``execute`` as an HTTP worker starts it: in this thread, which has no loop. Returns
    whether it finished here, the tasks the loop adopted, and (result, record JSON)."""
    import threading

    from fmedge.pipeline.run import drive

    heard, settled, adopted = [], threading.Event(), []

    def recorded(result, payload):
        heard.append((result, payload))
        settled.set()

    coroutine = executor.execute(document=document, inputs=inputs or {},
                                 on_recorded=recorded)
    finished, _ = drive(coroutine, loop, adopted.append)
    assert settled.wait(30), "the run's record was never reported"
    return finished, adopted, heard[0]


def test_a_quick_run_runs_entirely_in_the_thread_that_drives_it(tmp_path):
    executor = make(tmp_path)
    with LoopThread() as loop:
        finished, adopted, (result, payload) = drive_here(executor, loop, QUICK, {"x": 3})
    assert finished and not adopted          # never handed to the loop
    assert result.status == "completed" and result.output["result"] == {"x": 3}
    assert executor.results.get_now(result.run_id)["status"] == "completed"
    assert (executor.running, executor.queue_depth) == (0, 0)


def test_a_driven_run_that_waits_moves_to_the_loop(tmp_path):
    executor = make(tmp_path, llm=ScriptedAdapter())
    document = {"id": "t", "stages": [
        stage("quick", "json_transform", data={"topic": "{{input.topic}}"}),
        {"id": "write", "type": "generator", "depends_on": ["quick"],
         "config": {"prompt": "about {{upstream.quick.result.topic}}"}}]}
    with LoopThread() as loop:
        finished, adopted, (result, payload) = drive_here(executor, loop, document,
                                                          {"topic": "pumps"})
    assert not finished and len(adopted) == 1
    assert result.status == "completed", result.error
    assert result.output["content"].startswith("Scripted reply")


def test_a_driven_run_without_a_free_slot_waits_for_one_in_the_loop(tmp_path):
    import threading

    executor = EdgeExecutor(EdgeConfig(data_dir=str(tmp_path), max_concurrent=1))
    executor.pipelines.store_now("quick", QUICK)
    assert executor.slots.admit(5) == "run"          # another run holds the only slot
    with LoopThread() as loop:
        outcome = []
        driver = threading.Thread(target=lambda: outcome.append(
            drive_here(executor, loop, QUICK, {"x": 5})))
        driver.start()
        wait_for = time_limit()
        while executor.queue_depth != 1:                 # queued, its record written
            assert next(wait_for), "the run never queued"
        executor.slots.give_back()                       # the other run ends
        driver.join(30)
    finished, adopted, (result, _) = outcome[0]
    assert not finished and len(adopted) == 1 and result.status == "completed"
    assert (executor.running, executor.queue_depth) == (0, 0)


def time_limit(seconds=30.0):
    """True while within ``seconds`` (polled with a short pause), then False."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        time.sleep(0.001)
        yield time.monotonic() < deadline


def test_a_driven_quick_run_that_runs_long_carries_on_in_the_loop(tmp_path):
    executor = make(tmp_path)
    run(executor, QUICK, {"x": 0})                  # opens the store
    written = statuses_written(executor.results)
    with LoopThread() as loop:
        finished, adopted, (result, _) = drive_here(executor, loop, busy_chain(3))
    # Past its first long stage it paused: into the loop, under its time limit, and
    # recorded as running from then on.
    assert not finished and len(adopted) == 1
    assert result.status == "completed" and len(result.stages) == 3
    assert written() == ["running", "completed"]
