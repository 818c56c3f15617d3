"""Control-flow components: they decide, and return a ``directive`` the run acts on.

Inputs and output field names follow the reference (semantics §4.4). What the run does
with each directive lives in ``fmedge.pipeline.control``.
"""

from . import component
from .base import ComponentError, Field

_LIST = list  # a Field default factory: each stage gets its own empty list


def _truth(ctx, expression, names):
    """A safe boolean expression; an expression that fails reads as false (reference)."""
    try:
        return bool(ctx.evaluate(expression, names))
    except Exception as error:  # noqa: BLE001 - the reference treats any failure as false
        ctx.log("warning", f"expression {expression!r} failed ({error}); taken as false")
        return False


@component("conditional", fields={
    "condition": Field("any"), "condition_expression": Field("str?"),
    "true_branch_stages": Field("list[str]", default=_LIST),
    "false_branch_stages": Field("list[str]", default=_LIST), "pass_data": Field("any?")})
def conditional(ctx):
    inputs = ctx.inputs
    if inputs.get("condition") is None:
        raise ComponentError(f"stage {ctx.stage_id}: 'condition' resolved to null; give it a "
                             "value or a template that produces one")
    value = inputs["condition"]
    expression = inputs.get("condition_expression")
    result = _truth(ctx, expression, {"value": value}) if expression else bool(value)
    taken, other = (("true", "false_branch_stages") if result
                    else ("false", "true_branch_stages"))
    chosen = inputs["true_branch_stages" if result else "false_branch_stages"]
    return {"branch_taken": taken, "condition_value": value, "condition_result": result,
            "data": inputs.get("pass_data"),
            "directive": {"directive_type": "conditional", "branch_taken": taken,
                          "skip_stages": list(inputs[other]), "execute_stages": list(chosen)}}


@component("router", fields={
    "value": Field("any"), "routes": Field("dict", required=True),
    "default_route": Field("list[str]", default=_LIST), "value_expression": Field("str?"),
    "case_insensitive": Field("bool", default=False), "pass_data": Field("any?")})
def router(ctx):
    inputs = ctx.inputs
    original = inputs.get("value")
    value = original
    if inputs.get("value_expression"):
        try:
            value = ctx.evaluate(inputs["value_expression"], {"value": original})
        except Exception as error:  # noqa: BLE001 - reference: a failing transform is ignored
            ctx.log("warning", f"value_expression failed ({error}); using the raw value")
    routes = {str(k): list(v or []) for k, v in inputs["routes"].items()}
    route = _match_route(routes, value, inputs["case_insensitive"])
    chosen = routes[route] if route != "default" else list(inputs["default_route"])
    every = {s for stages in routes.values() for s in stages} | set(inputs["default_route"])
    skipped = sorted(every - set(chosen))
    return {"route_taken": route, "original_value": original, "matched_value": value,
            "stages_to_execute": chosen, "stages_to_skip": skipped,
            "data": inputs.get("pass_data"),
            "directive": {"directive_type": "router", "branch_taken": route,
                          "skip_stages": skipped, "execute_stages": chosen}}


def _match_route(routes, value, case_insensitive):
    if case_insensitive and isinstance(value, str):
        value = value.lower()
        routes = {k.lower(): k for k in routes}
        key = routes.get(value) or routes.get(str(value))
        return key if key is not None else "default"
    if isinstance(value, str) and value in routes:
        return value
    return str(value) if str(value) in routes else "default"


@component("foreach", fields={
    "items": Field("list", required=True), "loop_stages": Field("list[str]", default=_LIST),
    "item_variable": Field("str", default="item"), "index_variable": Field("str", default="index"),
    "collect_results": Field("bool", default=True), "parallel": Field("bool", default=False),
    "max_parallel": Field("int", default=5), "break_on_error": Field("bool", default=True),
    "filter_expression": Field("str?")})
def foreach(ctx):
    inputs = ctx.inputs
    items = list(inputs["items"])
    expression = inputs.get("filter_expression")
    kept = [item for item in items
            if not expression or _truth(ctx, expression, {"item": item})]
    if inputs["max_parallel"] < 1:
        raise ComponentError(f"stage {ctx.stage_id}: max_parallel must be at least 1")
    return {"total_items": len(items), "processed_items": 0,
            "skipped_items": len(items) - len(kept),
            "current_item": kept[0] if kept else None, "current_index": 0,
            "items_to_process": kept, "results": [], "is_complete": not kept,
            "directive": {"directive_type": "foreach", "loop_items": kept,
                          "loop_stages": list(inputs["loop_stages"]),
                          "item_variable": inputs["item_variable"],
                          "index_variable": inputs["index_variable"],
                          "collect_results": inputs["collect_results"],
                          "parallel": inputs["parallel"],
                          "max_parallel": inputs["max_parallel"],
                          "break_on_error": inputs["break_on_error"]}}


@component("trycatch", fields={
    "try_stages": Field("list[str]", required=True),
    "catch_stages": Field("list[str]", default=_LIST),
    "finally_stages": Field("list[str]", default=_LIST),
    "error_scope": Field("str", default="propagate"),
    "catch_error_types": Field("list[str]", default=_LIST),
    "max_retries": Field("int", default=0), "retry_delay_ms": Field("int", default=1000),
    "pass_data": Field("any?")})
def trycatch(ctx):
    inputs = ctx.inputs
    if inputs["error_scope"] not in ("propagate", "continue"):
        raise ComponentError(f"stage {ctx.stage_id}: error_scope must be 'propagate' or "
                             f"'continue', got {inputs['error_scope']!r}")
    return {"status": "pending", "error_occurred": False, "error_message": None,
            "error_type": None, "recovered": False, "try_result": None,
            "catch_result": None, "data": inputs.get("pass_data"),
            "directive": {"directive_type": "trycatch",
                          "try_stages": list(inputs["try_stages"]),
                          "catch_stages": list(inputs["catch_stages"]),
                          "finally_stages": list(inputs["finally_stages"]),
                          "error_scope": inputs["error_scope"],
                          "catch_error_types": list(inputs["catch_error_types"])}}


@component("return", fields={
    "condition": Field("bool", default=True), "condition_expression": Field("str?"),
    "return_value": Field("any?"), "message": Field("str?"),
    "status": Field("str", default="completed")})
def return_(ctx):
    inputs = ctx.inputs
    expression = inputs.get("condition_expression")
    # Reference: the expression sees the run's variables only (and wins over condition).
    triggered = (_truth(ctx, expression, dict(ctx.run.variables)) if expression
                 else inputs["condition"])
    return {"should_return": triggered, "return_value": inputs.get("return_value"),
            "message": inputs.get("message"),
            "status": inputs["status"] if triggered else "running", "remaining_stages": [],
            "directive": {"directive_type": "return", "should_return": triggered}}


@component("subpipeline", fields={
    "pipeline_id": Field("str", required=True), "pipeline_version": Field("str?"),
    "input_data": Field("dict", default=dict), "timeout_ms": Field("int", default=60000),
    "on_error": Field("str", default="propagate"), "default_result": Field("any?")})
def subpipeline(ctx):
    inputs = ctx.inputs
    if inputs["on_error"] not in ("propagate", "default", "ignore"):
        raise ComponentError(f"stage {ctx.stage_id}: on_error must be propagate, default or "
                             f"ignore, got {inputs['on_error']!r}")
    return {"pipeline_id": inputs["pipeline_id"], "run_id": None, "status": "pending",
            "result": None, "execution_time_ms": 0, "error": None,
            "directive": {"directive_type": "subpipeline",
                          "pipeline_id": inputs["pipeline_id"],
                          "pipeline_version": inputs.get("pipeline_version"),
                          "input_data": inputs["input_data"],
                          "timeout_ms": inputs["timeout_ms"], "on_error": inputs["on_error"],
                          "default_result": inputs.get("default_result")}}
