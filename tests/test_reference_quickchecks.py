"""semantics §7's 17 reference quick checks, pinned as fm-edge's documented behaviour.

Each test names the check, what FlowMason 1.0.24 does, and whether fm-edge keeps it or
fixes it (design §5; the README's "Differences from FlowMason 1.0.24" lists the fixes).
"""

import asyncio

import pytest

from fmedge.config import EdgeConfig
from fmedge.pipeline.executor import EdgeExecutor
from llm_double import ScriptedAdapter


@pytest.fixture
def adapter():
    return ScriptedAdapter()


@pytest.fixture
def execute(tmp_path, adapter):
    executor = EdgeExecutor(EdgeConfig(data_dir=str(tmp_path)), llm=adapter)

    def run(stages, inputs=None, **extra):
        document = dict({"id": "quick", "stages": stages}, **extra)
        return asyncio.run(executor.execute(document=document, inputs=inputs or {}))
    return run


def transform(stage_id, data, depends_on=(), **extra):
    return dict({"id": stage_id, "type": "json_transform", "depends_on": list(depends_on),
                 "config": {"data": data}}, **extra)


def test_01_int_into_a_str_field_is_coerced_fixed(execute, adapter):
    # Reference: coercion error (int -> str). fm-edge: the number is rendered as text.
    result = execute([{"id": "g", "type": "generator", "config": {"prompt": "{{input.n}}"}}],
                     {"n": 5})
    assert result.status == "completed" and adapter.calls[0].prompt.endswith("5")


def test_02_mixed_strings_render_values_kept_with_json_objects(execute):
    # Reference: Python repr of dicts. fm-edge keeps True/"" for bool/null and renders
    # objects as JSON (design §5).
    result = execute([transform("t", {"text": "n={{input.n}} d={{input.d}} b={{input.b}} "
                                              "z={{input.z}}"})],
                     {"n": 5, "d": {"a": "x"}, "b": True, "z": None})
    assert result.output["result"]["text"] == 'n=5 d={"a": "x"} b=True z='


def test_03_whole_value_template_ignores_outer_whitespace_kept(execute):
    result = execute([transform("t", "  {{input.p}}  ")], {"p": [1, 2]})
    assert result.output["result"] == [1, 2]


def test_04_paths_numeric_index_fixed_missing_kept_stages_namespace_fixed(execute):
    ok = execute([transform("x", {"v": "{{input.items.0}}"}),
                  transform("y", "{{stages.x.output.result}}", ["x"])], {"items": ["a"]})
    assert ok.output["result"] == {"v": "a"}
    missing = execute([transform("t", "{{input.missing}}")])
    assert missing.status == "failed" and "input.missing" in missing.error


def test_05_config_wins_over_input_mapping_kept(execute, adapter):
    stage = {"id": "g", "type": "generator", "config": {"prompt": "A"},
             "input_mapping": {"prompt": "B"}}
    assert execute([stage]).status == "completed"
    assert adapter.calls[0].prompt == "A"


def test_06_prose_criteria_string_accepted_fixed(execute):
    stages = [{"id": "c", "type": "critic",
               "config": {"content": "text", "criteria": "clarity, tone"}}]
    result = execute(stages)
    assert result.status == "completed" and "score" in result.output


def test_07_null_into_a_required_any_field_is_an_error_kept(execute):
    result = execute([{"id": "f", "type": "filter", "config": {"data": "{{input.x}}"}}],
                     {"x": None})
    assert result.status == "failed" and result.error_type == "MappingExecutionError"


@pytest.mark.parametrize("flag,branch", [(False, "false"), ("flag=False", "true")])
def test_08_conditional_truthiness_kept(execute, flag, branch):
    result = execute([{"id": "gate", "type": "conditional",
                       "config": {"condition": "{{input.flag}}"}}], {"flag": flag})
    assert result.output["branch_taken"] == branch


def test_09_skipped_inputs_transitive_when_all_skipped_fixed(execute):
    stages = [{"id": "gate", "type": "conditional",
               "config": {"condition": True, "false_branch_stages": ["no"]}},
              transform("no", {}, ["gate"]),
              transform("only-no", {}, ["no"]),
              transform("mixed", {"seen": "{{upstream.no}}"}, ["no", "gate"])]
    result = execute(stages)
    assert result.stages["only-no"].status == "skipped"
    assert result.stages["mixed"].output["result"] == {
        "seen": {"skipped": True, "reason": "control_flow"}}


def test_10_foreach_records_and_results_kept(execute):
    stages = [{"id": "each", "type": "foreach",
               "config": {"items": ["a", "b"], "loop_stages": ["x", "y"]}},
              transform("x", "{{context.item}}", ["each"]),
              transform("y", "{{upstream.x.result}}!", ["x"])]
    result = execute(stages, output_stage_id="each")
    order = [k for k in result.stages if "_iter_" in k]
    assert order == ["x_iter_0", "y_iter_0", "x_iter_1", "y_iter_1"]
    assert result.stages["x"].status == result.stages["y"].status == "skipped"
    assert [r["result"] for r in result.output["results"]] == ["a!", "b!"]


def test_11_trycatch_continue_reports_the_caught_mapping_error_kept(execute):
    stages = [{"id": "tc", "type": "trycatch",
               "config": {"try_stages": ["bad"], "catch_stages": ["c"],
                          "finally_stages": ["f"], "error_scope": "continue"}},
              transform("bad", "{{input.nope.x}}", ["tc"]),
              transform("c", "caught", ["tc"]), transform("f", "finally", ["tc"])]
    result = execute(stages, output_stage_id="tc")
    assert result.output["status"] == "caught" and result.output["recovered"] is True
    assert result.output["error_type"] == "MappingExecutionError"
    assert result.stages["c"].status == result.stages["f"].status == "success"


def test_12_router_default_route_kept(execute):
    stages = [{"id": "r", "type": "router",
               "config": {"value": "zzz", "routes": {"a": ["a"], "b": ["b"]},
                          "default_route": ["d"]}},
              transform("a", 1, ["r"]), transform("b", 2, ["r"]), transform("d", 3, ["r"])]
    result = execute(stages)
    assert result.stages["r"].output["route_taken"] == "default"
    assert result.stages["a"].status == result.stages["b"].status == "skipped"


def test_13_continue_without_fallback_gives_null_and_deeper_paths_fail_kept(execute):
    stages = [transform("bad", "{{input.nope.x}}", on_error="continue"),
              transform("next", "{{upstream.bad.content}}", ["bad"])]
    result = execute(stages)
    assert result.stages["bad"].status == "failed" and result.stages["bad"].output is None
    assert result.status == "failed" and result.failed_stage == "next"


def test_14_timeouts_and_retry_exhaustion_kept(execute, adapter):
    adapter.slow_next(3, seconds=3600)
    stage = {"id": "g", "type": "generator", "timeout_ms": 100,
             "retry_config": {"max_retries": 2, "initial_delay_ms": 0},
             "config": {"prompt": "p"}}
    result = execute([stage])
    assert result.error_type == "RetryExhaustedError" and len(adapter.calls) == 3
    adapter.slow_next(1, seconds=3600)
    single = execute([dict(stage, retry_config=None)])
    assert single.error_type == "TimeoutExecutionError"


def test_15_variable_set_is_readable_from_context_fixed(execute):
    stages = [{"id": "v", "type": "variable_set", "config": {"name": "who", "value": "pi"}},
              transform("t", "{{context.who}}", ["v"])]
    assert execute(stages).output["result"] == "pi"


def test_16_enabled_false_skips_fixed(execute):
    result = execute([transform("off", "{{input.nope}}", enabled=False),
                      transform("on", 1)])
    assert result.status == "completed" and result.stages["off"].status == "skipped"


def test_17_hyphenated_type_names_fixed(execute):
    result = execute([{"id": "t", "type": "json-transform", "config": {"data": 1}}])
    assert result.status == "completed" and result.output["result"] == 1
