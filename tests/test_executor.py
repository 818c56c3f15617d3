"""EdgeExecutor without an LLM: scheduling, skips, control flow, errors, records."""

import asyncio

import pytest

from fmedge.config import EdgeConfig
from fmedge.errors import NotFoundError, UsageError
from fmedge.pipeline.executor import EdgeExecutor


def make_executor(tmp_path, **config):
    return EdgeExecutor(EdgeConfig(data_dir=str(tmp_path), **config))


def run(executor, document, inputs=None, **kwargs):
    return asyncio.run(executor.execute(document=document, inputs=inputs or {}, **kwargs))


def stage(stage_id, type_, depends_on=(), **config):
    return {"id": stage_id, "type": type_, "depends_on": list(depends_on), "config": config}


def pipeline(*stages, **extra):
    return dict({"id": "t", "stages": list(stages)}, **extra)


def echo(stage_id, data, depends_on=()):
    return stage(stage_id, "json_transform", depends_on, data=data)


@pytest.fixture
def executor(tmp_path):
    return make_executor(tmp_path)


def test_output_is_the_last_declared_stage_and_each_run_is_recorded(executor):
    result = run(executor, pipeline(echo("a", {"x": "{{input.x}}"}),
                                    echo("b", {"y": "{{upstream.a.result.x}}"}, ["a"])),
                 {"x": 7})
    assert result.status == "completed" and result.output["result"] == {"y": 7}
    assert result.output_stage_id == "b" and result.duration_ms >= 0
    saved = executor.results.get_now(result.run_id)
    assert saved["status"] == "completed" and saved["output"]["result"] == {"y": 7}
    assert saved["stages"]["a"]["status"] == "success"


def test_output_stage_id_wins(executor):
    document = pipeline(echo("a", {"v": 1}), echo("b", {"v": 2}), output_stage_id="a")
    assert run(executor, document).output["result"] == {"v": 1}


def test_stages_of_one_wave_do_not_see_each_other(executor):
    document = pipeline(echo("a", {"v": 1}), echo("b", {"v": "{{upstream.a.result.v}}"}))
    result = run(executor, document)
    assert result.status == "failed" and result.failed_stage == "b"
    assert "upstream.a" in result.error and result.error_type == "MappingExecutionError"


def test_hyphenated_ids_and_expressions_in_templates(executor):
    document = pipeline(
        echo("prepare-batch", {"batches": "{{[input.items[0:2], input.items[2:]]}}"}),
        echo("use", {"first": "{{upstream.prepare-batch.result.batches[0]}}",
                     "n": "{{len(input.items)}}", "mode": "{{input.mode or 'auto'}}",
                     "text": "n={{len(input.items)}} first={{input.items[0]}}",
                     "stage": "{{context.stage_id}}", "run": "{{context.run_id}}"},
             ["prepare-batch"]))
    result = run(executor, document, {"items": [1, 2, 3]})
    assert result.status == "completed", result.error
    out = result.output["result"]
    assert out["first"] == [1, 2] and out["n"] == 3 and out["mode"] == "auto"
    assert out["text"] == "n=3 first=1" and out["stage"] == "use"
    assert out["run"] == result.run_id


def test_missing_template_path_fails_naming_the_path(executor):
    result = run(executor, pipeline(echo("a", {"v": "{{input.missing.deep}}"})), {})
    assert result.status == "failed" and "input.missing" in result.error


def test_conditional_skips_the_other_branch_transitively(executor):
    document = pipeline(
        stage("gate", "conditional", condition="{{input.ok}}",
              true_branch_stages=["yes"], false_branch_stages=["no"]),
        echo("yes", {"branch": "yes"}, ["gate"]),
        echo("no", {"branch": "no"}, ["gate"]),
        echo("after-no", {"v": 1}, ["no"]),                       # only a skipped input
        echo("join", {"yes": "{{upstream.yes}}", "no": "{{upstream.no}}"}, ["yes", "no"]))
    result = run(executor, document, {"ok": True})
    statuses = {k: v.status for k, v in result.stages.items()}
    assert statuses == {"gate": "success", "yes": "success", "no": "skipped",
                        "after-no": "skipped", "join": "success"}
    joined = result.output["result"]
    assert joined["no"] == {"skipped": True, "reason": "control_flow"}
    assert joined["yes"]["result"] == {"branch": "yes"}


def test_conditional_expression_and_truthy_strings(executor):
    document = pipeline(
        stage("gate", "conditional", condition="{{input.score}}",
              condition_expression="value >= 0.8", true_branch_stages=["pub"],
              false_branch_stages=["rewrite"]),
        echo("pub", {"v": "pub"}, ["gate"]), echo("rewrite", {"v": "rw"}, ["gate"]))
    assert run(executor, document, {"score": 0.9}).stages["rewrite"].status == "skipped"
    assert run(executor, document, {"score": 0.1}).stages["pub"].status == "skipped"


def test_router_takes_the_default_route(executor):
    document = pipeline(
        stage("route", "router", value="{{input.kind}}",
              routes={"a": ["sa"], "b": ["sb"]}, default_route=["sd"]),
        echo("sa", {"v": "a"}, ["route"]), echo("sb", {"v": "b"}, ["route"]),
        echo("sd", {"v": "d"}, ["route"]))
    result = run(executor, document, {"kind": "zzz"})
    assert result.stages["route"].output["route_taken"] == "default"
    assert [result.stages[s].status for s in ("sa", "sb", "sd")] == [
        "skipped", "skipped", "success"]


def foreach_document(parallel=False, body_extra=()):
    return pipeline(
        stage("each", "foreach", items="{{input.items}}", item_variable="thing",
              loop_stages=["double", "note"] + list(body_extra), parallel=parallel),
        echo("double", {"v": "{{context.thing * 2}}", "i": "{{context.index}}"}, ["each"]),
        echo("note", {"v": "{{upstream.double.result.v}}",
                      "item": "{{upstream.each.thing}}",
                      "total": "{{context.loop_total}}"}, ["double"]),
        echo("report", {"all": "{{upstream.each.results}}"}, ["each"]),
        output_stage_id="report")


@pytest.mark.parametrize("parallel", [False, True])
def test_foreach_runs_the_body_per_item_with_its_own_scope(executor, parallel):
    result = run(executor, foreach_document(parallel), {"items": [1, 2, 3]})
    assert result.status == "completed", result.error
    values = [entry["result"] for entry in result.output["result"]["all"]]
    assert values == [{"v": 2, "item": 1, "total": 3}, {"v": 4, "item": 2, "total": 3},
                      {"v": 6, "item": 3, "total": 3}]
    assert result.stages["double_iter_2"].output["result"] == {"v": 6, "i": 2}
    assert result.stages["double"].status == "skipped"   # its DAG slot (reference §7.10)
    assert result.stages["each"].output["processed_items"] == 3


def test_foreach_break_and_continue(executor):
    document = pipeline(
        stage("each", "foreach", items="{{input.items}}", loop_stages=["skip-odd", "stop",
                                                                        "keep"]),
        stage("skip-odd", "continue_loop", ["each"], condition="{{context.item % 2 == 1}}"),
        stage("stop", "break_loop", ["skip-odd"], condition="{{context.item >= 6}}"),
        echo("keep", {"v": "{{context.item}}"}, ["stop"]),
        echo("report", {"all": "{{upstream.each.results}}"}, ["each"]),
        output_stage_id="report")
    result = run(executor, document, {"items": [1, 2, 3, 4, 5, 6, 7, 8]})
    assert result.status == "completed", result.error
    assert [r["result"]["v"] for r in result.output["result"]["all"]] == [2, 4]


def test_foreach_break_on_error_false_drops_failed_iterations(executor):
    document = pipeline(
        stage("each", "foreach", items="{{input.items}}", loop_stages=["pick"],
              break_on_error=False),
        echo("pick", {"v": "{{context.item.value}}"}, ["each"]),
        echo("report", {"all": "{{upstream.each.results}}"}, ["each"]),
        output_stage_id="report")
    result = run(executor, document, {"items": [{"value": 1}, {"other": 2}, {"value": 3}]})
    assert [r["result"]["v"] for r in result.output["result"]["all"]] == [1, 3]
    strict = dict(document, stages=[dict(document["stages"][0], config=dict(
        document["stages"][0]["config"], break_on_error=True))] + document["stages"][1:])
    assert run(executor, strict, {"items": [{"value": 1}, {"other": 2}]}).status == "failed"


def trycatch_document(scope="continue", types=()):
    return pipeline(
        stage("guard", "trycatch", try_stages=["risky"], catch_stages=["handle"],
              finally_stages=["cleanup"], error_scope=scope,
              catch_error_types=list(types)),
        echo("risky", {"v": "{{input.nope.deeper}}"}, ["guard"]),
        echo("handle", {"caught": "{{upstream.guard.error_type}}"}, ["guard"]),
        echo("cleanup", {"done": True}, ["guard"]),
        echo("after", {"status": "{{upstream.guard.status}}",
                       "recovered": "{{upstream.guard.recovered}}"}, ["guard"]),
        output_stage_id="after")


def test_trycatch_catches_and_continues(executor):
    result = run(executor, trycatch_document())
    assert result.status == "completed", result.error
    assert result.output["result"] == {"status": "caught", "recovered": True}
    assert result.stages["handle"].output["result"] == {"caught": "MappingExecutionError"}
    assert result.stages["cleanup"].status == "success"


def test_trycatch_matches_fm_edge_and_reference_names(executor):
    for names in (["MappingExecutionError"], ["mapping_error"]):
        assert run(executor, trycatch_document(types=names)).status == "completed"


def test_trycatch_continue_does_not_swallow_unmatched_types(executor):
    result = run(executor, trycatch_document(types=["TimeoutExecutionError"]))
    assert result.status == "failed" and result.failed_stage == "guard"
    assert "handle" not in result.stages                     # catch did not match
    assert result.stages["cleanup"].status == "success"     # finally always runs


def test_trycatch_propagate_fails_the_run(executor):
    assert run(executor, trycatch_document(scope="propagate")).status == "failed"


def test_return_ends_the_run_with_its_value(executor):
    document = pipeline(
        echo("a", {"v": 1}),
        stage("stop", "return", ["a"], condition="{{input.stop}}",
              return_value={"early": "{{upstream.a.result.v}}"}),
        echo("later", {"v": 2}, ["stop"]))
    early = run(executor, document, {"stop": True})
    assert early.status == "completed" and early.output == {"early": 1}
    assert "later" not in early.stages and early.output_stage_id == "stop"
    normal = run(executor, document, {"stop": False})
    assert normal.output["result"] == {"v": 2}


def test_on_error_continue_uses_the_fallback_output(executor):
    document = pipeline(
        dict(echo("bad", {"v": "{{input.missing}}"}), on_error="continue",
             fallback_output={"v": "fallback for {{input.name}}"}),
        echo("next", {"got": "{{upstream.bad.v}}"}, ["bad"]))
    result = run(executor, document, {"name": "x"})
    assert result.status == "completed", result.error
    assert result.stages["bad"].status == "failed"
    assert result.output["result"] == {"got": "fallback for x"}


def test_failure_propagates_with_the_failed_stage(executor):
    document = pipeline(echo("bad", {"v": "{{input.missing}}"}), echo("next", {}, ["bad"]))
    result = run(executor, document)
    assert result.status == "failed" and result.failed_stage == "bad"
    assert "next" not in result.stages
    assert executor.results.get_now(result.run_id)["status"] == "failed"


def test_disabled_stage_is_skipped(executor):
    document = pipeline(dict(echo("off", {"v": "{{input.missing}}"}), enabled=False),
                        echo("on", {"v": 1}))
    result = run(executor, document)
    assert result.status == "completed"
    assert result.stages["off"].output == {"skipped": True, "reason": "disabled"}


def test_variable_set_is_readable_in_context(executor):
    document = pipeline(stage("remember", "variable_set", name="greeting",
                              value="hello {{input.who}}"),
                        echo("use", {"v": "{{context.greeting}}"}, ["remember"]))
    assert run(executor, document, {"who": "pi"}).output["result"] == {"v": "hello pi"}


def test_env_only_exposes_allow_listed_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SITE_NAME", "plant-7")
    monkeypatch.setenv("FLOWMASON_API_KEY", "secret")
    allowed = make_executor(tmp_path, env_allowlist=["SITE_NAME"])
    document = pipeline(echo("a", {"site": "{{env.SITE_NAME}}"}))
    assert run(allowed, document).output["result"] == {"site": "plant-7"}
    leak = run(allowed, pipeline(echo("a", {"k": "{{env.FLOWMASON_API_KEY}}"})))
    assert leak.status == "failed" and "secret" not in leak.error


def test_subpipeline_runs_a_cached_pipeline_and_limits_depth(executor):
    child = pipeline(echo("double", {"v": "{{input.n * 2}}"}), id="child")
    executor.pipelines.store_now("child", child)
    parent = pipeline(stage("call", "subpipeline", pipeline_id="child",
                            input_data={"n": "{{input.n}}"}),
                      echo("use", {"v": "{{upstream.call.result.result.v}}"}, ["call"]))
    result = run(executor, parent, {"n": 21})
    assert result.status == "completed", result.error
    assert result.output["result"] == {"v": 42}
    assert result.stages["call"].output["status"] == "completed"
    looping = pipeline(stage("again", "subpipeline", pipeline_id="loop"), id="loop")
    executor.pipelines.store_now("loop", looping)
    deep = asyncio.run(executor.execute(pipeline_id="loop"))
    assert deep.status == "failed" and "nested deeper" in deep.error


def test_input_schema_required_defaults_and_types(executor):
    document = pipeline(echo("a", {"x": "{{input.x}}", "mode": "{{input.mode}}"}),
                        input_schema={"required": ["x"], "properties": {
                            "x": {"type": "integer"}, "mode": {"type": "string",
                                                               "default": "fast"}}})
    assert run(executor, document, {"x": 1}).output["result"] == {"x": 1, "mode": "fast"}
    with pytest.raises(UsageError, match="'x' is required"):
        run(executor, document, {})
    with pytest.raises(UsageError, match="'x' must be integer, got string"):
        run(executor, document, {"x": "one"})


def test_unknown_pipeline_and_bad_ids(executor):
    with pytest.raises(NotFoundError, match="fm-edge add"):
        asyncio.run(executor.execute(pipeline_id="nope"))
    with pytest.raises(UsageError):
        asyncio.run(executor.execute(pipeline_id="../etc/passwd"))


def test_abstract_pipelines_do_not_run(executor):
    with pytest.raises(UsageError, match="abstract"):
        run(executor, pipeline(echo("a", {}), abstract=True))


def test_seed_executor_example_runs_verbatim(tmp_path):
    from seed import adapt, example, run_example

    names = run_example(adapt(example("Edge Executor"), tmp_path))
    result = names["result"]
    assert result.status == "completed" and result.duration_ms > 0
    assert result.output["statistics"]["mean"] == 2.0


def test_json_transform_template_reads_its_own_data(executor):
    document = pipeline(stage("shape", "json_transform", data={"items": "{{input.items}}"},
                              template={"count": "{{len(data.items)}}",
                                        "first": "{{data.items[0]}}",
                                        "channel": "{{input.channel or 'web'}}"}))
    result = run(executor, document, {"items": ["a", "b"]})
    assert result.status == "completed", result.error
    assert result.output == {"count": 2, "first": "a", "channel": "web"}


# The child only writes to a pipe and exits: nothing there can wait for another thread.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_run_ids_are_unique_hex_and_a_forked_child_draws_its_own():
    import os

    from fmedge.ids import new_run_id

    ids = {new_run_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(len(run_id) == 32 and int(run_id, 16) >= 0 for run_id in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                          # the child: its first id, then out at once
        os.write(write, new_run_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    # Without a fresh seed the child would repeat the parent's next id.
    assert len(child_id) == 32 and child_id != new_run_id()
