"""Pure data operators: reshape, test, log, validate and remember values (semantics §4.3-4.4).

Input fields and output field names are the reference's (flowmason 1.0.24). Where fm-edge
does more or differs, the component's docstring says so; the README lists the deviations.
None of these components touch the network or the disk, so they run inline.

Shared conventions:
* a *path* (``mapping`` values, ``extract_path``, ``value_path``, rule ``field``) is a dot
  path with ``[i]`` indexes: ``user.tags[0].name``; numeric segments index arrays too
  (``items.0``). A missing step gives null; paths never raise.
* bad component settings (an unknown mode, a malformed case) raise MappingError naming the
  field, the value and the fix, instead of being silently ignored as in the reference.
"""

import functools
import hashlib
import itertools
import json
import logging
import math
import re

from ...errors import ExpressionError
from . import component
from .base import BreakLoop, ComponentError, ContinueLoop, Field, MappingError

log = logging.getLogger("fmedge.pipeline.logger")

_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- shared helpers ----------------------------------------------------------------------

def path_steps(path):
    """``"a.b[0].c"`` -> ``["a", "b", 0, "c"]`` (the reference's dot-and-bracket syntax)."""
    steps = _parsed_path(str(path))
    return None if steps is None else list(steps)


@functools.lru_cache(maxsize=1024)
def _parsed_path(path):
    """The steps of ``path`` as a tuple, parsed once: the same paths come back every run."""
    steps = []
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("[") and part.endswith("]"):
            try:
                steps.append(int(part[1:-1]))
            except ValueError:
                return None   # "[x]" is not an index: the path matches nothing
        else:
            steps.append(part)
    return tuple(steps)


def lookup_path(data, path):
    """The value at ``path`` inside ``data``, or None when any step is missing."""
    steps = _parsed_path(path if type(path) is str else str(path))
    if steps is None:
        return None
    current = data
    for step in steps:
        if type(step) is str and type(current) is dict:   # the common case, inline
            current = current.get(step)
        else:
            current = _step(current, step)
        if current is None:
            return None
    return current


def _step(current, step):
    if isinstance(step, str) and isinstance(current, dict):
        return current.get(step)
    if isinstance(current, list):
        if isinstance(step, str):
            if not step.lstrip("-").isdigit():
                return None
            step = int(step)
        return current[step] if -len(current) <= step < len(current) else None
    return None


def _choice(type_name, field, value, choices, aliases=None):
    """``value`` matched case-insensitively against ``choices``; MappingError otherwise."""
    if type(value) is str and value in choices:   # as written, the usual case
        return value
    word = str(value).strip().lower()
    word = (aliases or {}).get(word, word)
    if word in choices:
        return word
    raise MappingError("{}: {} {!r} is not one of {}; use one of those".format(
        type_name, field, value, ", ".join(choices)))


def _in_range(type_name, field, value, low=None, high=None):
    if value is None:
        return value
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = "from {} to {}".format(low, high) if high is not None else ">= {}".format(low)
        raise MappingError("{}: {} is {!r}; it must be {}".format(type_name, field, value,
                                                                 bounds))
    return value


def _given(inputs, name, default):
    """``inputs[name]``, or ``default`` when absent or null (0 and "" are values)."""
    value = inputs.get(name)
    return default if value is None else value


def _short(value, limit=120):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- json_transform ------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?\s*([\s\S]*?)```")


def parse_json_text(text):
    """The reference's lenient JSON reading of an LLM reply; the text itself when it fails.

    Order: the first Markdown code fence's content; strict JSON; the first balanced
    ``{...}``, then ``[...]``. Strings inside the JSON may contain brackets.
    """
    if not isinstance(text, str) or not text:
        return text
    candidate = text.strip()
    fence = _FENCE.search(candidate) if "```" in candidate else None
    if fence:
        candidate = fence.group(1).strip()
    try:
        return json.loads(candidate)
    except ValueError:
        pass
    for opener, closer in (("{", "}"), ("[", "]")):
        found = _balanced(candidate, opener, closer)
        if found is not None:
            try:
                return json.loads(found)
            except ValueError:
                continue
    return text


def _balanced(text, opener, closer):
    start = text.find(opener)
    if start < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\" and in_string:
            escaped = True
        elif char == '"':
            in_string = not in_string
        elif not in_string and char == opener:
            depth += 1
        elif not in_string and char == closer:
            depth -= 1
            if depth == 0:
                return text[start:index + 1]
    return None


# JMESPath subset: names, "quoted names", [n] (negative counts from the end) and [*]
# projections, joined by dots. Everything else of JMESPath is refused by name.
_JMES_TOKEN = re.compile(r'\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|"(?P<quoted>(?:[^"\\]|\\.)*)"'
                         r'|\[(?P<index>-?\d+)\]|(?P<star>\[\*\])|(?P<dot>\.))')


def jmespath_steps(expression):
    """Parse the supported JMESPath subset into steps; ComponentError for anything else."""
    steps, position, expect_name = [], 0, True
    text = expression.strip()
    while position < len(text):
        match = _JMES_TOKEN.match(text, position)
        if not match or not _jmes_token_fits(match, expect_name, steps):
            raise ComponentError(
                "json_transform: jmespath_expression {!r} uses JMESPath syntax fm-edge does "
                "not have (at character {}); fm-edge supports dotted names, \"quoted\" names, "
                "[n] indexes and [*] projections, e.g. 'orders[*].items[0].sku'; use "
                "'mapping' or 'template' for anything else".format(expression, position + 1))
        position = match.end()
        expect_name = match.group("dot") is not None
        steps.extend(_jmes_step(match))
    if expect_name:   # nothing parsed, or a trailing dot
        raise ComponentError("json_transform: jmespath_expression {!r} is empty or ends with "
                             "'.'; write a path such as 'user.name'".format(expression))
    return steps


def _jmes_token_fits(match, expect_name, steps):
    is_name = match.group("name") is not None or match.group("quoted") is not None
    if match.group("dot"):
        return bool(steps) and not expect_name
    if is_name:
        return expect_name
    return not (expect_name and steps)   # [n]/[*] follow a value or start the expression


def _jmes_step(match):
    if match.group("name") is not None:
        return [("key", match.group("name"))]
    if match.group("quoted") is not None:
        try:
            return [("key", json.loads('"' + match.group("quoted") + '"'))]
        except ValueError:
            raise ComponentError("json_transform: jmespath_expression: {} is not a valid "
                                 "quoted name".format(match.group().strip())) from None
    if match.group("index") is not None:
        return [("index", int(match.group("index")))]
    if match.group("star"):
        return [("project", None)]
    return []


def jmespath_search(steps, value):
    """Apply parsed steps; like JMESPath, a missing step gives null and projections drop nulls."""
    for position, (kind, argument) in enumerate(steps):
        if kind == "project":
            if not isinstance(value, list):
                return None
            results = [jmespath_search(steps[position + 1:], item) for item in value]
            return [item for item in results if item is not None]
        if kind == "key":
            value = value.get(argument) if isinstance(value, dict) else None
        else:
            value = _step(value, argument) if isinstance(value, list) else None
        if value is None:
            return None
    return value


def flatten(data, parent_key="", separator="."):
    """The reference's flattening: ``{"a": {"b": 1}, "t": [5]}`` -> ``{"a.b": 1, "t[0]": 5}``."""
    items = {}
    if not isinstance(data, dict):
        items[parent_key or "value"] = data
        return items
    for key, value in data.items():
        new_key = "{}{}{}".format(parent_key, separator, key) if parent_key else str(key)
        if isinstance(value, dict):
            items.update(flatten(value, new_key, separator))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                item_key = "{}[{}]".format(new_key, index)
                if isinstance(item, dict):
                    items.update(flatten(item, item_key, separator))
                else:
                    items[item_key] = item
        else:
            items[new_key] = value
    return items


def template_names(inputs):
    """The names a json_transform ``template`` is resolved with: ``{"data": ...}``.

    The gallery's templates read the stage's own ``data`` (``{{len(data.items)}}``), so the
    executor resolves every other input first, then resolves ``template`` with these extra
    names. ``data`` is read as json_transform reads it (a JSON reply string is parsed).
    """
    data = inputs.get("data")
    if inputs.get("parse_json_strings", True) and isinstance(data, str):
        data = parse_json_text(data)
    return {"data": data}


@component("json_transform", fields={
    "data": Field("any?"),
    "mapping": Field("dict?"),
    "jmespath_expression": Field("str?"),
    "defaults": Field("dict?"),
    "flatten": Field("bool", default=False),
    "exclude_fields": Field("list?"),
    "parse_json_strings": Field("bool", default=True),
    "template": Field("any?"),
}, late_inputs={"template": lambda inputs: template_names(inputs)})
def json_transform(ctx):
    """Reshape ``data``. Output ``{result, fields_mapped, fields_missing}``, except in
    template mode.

    Modes, first that applies: ``template`` (fm-edge, for the gallery: the resolved
    template *is* the output, so its fields are read at the top level, e.g.
    ``{{upstream.ingest-inquiry.customer_message}}``; a non-object template gives
    ``{"result": value}``), ``jmespath_expression`` (the subset of ``jmespath_steps``),
    ``mapping`` (``{out: path}``, null replaced by ``defaults[out]`` and listed in
    ``fields_missing``), ``flatten``, else pass-through. ``exclude_fields`` drops keys of
    any object result (the reference only applies it to mappings).
    """
    inputs = ctx.inputs
    template = inputs.get("template")
    if template is not None:
        return _without(template if isinstance(template, dict) else {"result": template},
                        inputs.get("exclude_fields"))
    data = inputs.get("data")
    if data is None:
        raise MappingError("json_transform: input 'data' is required (got null or nothing); "
                           "pass the value to transform, e.g. \"data\": "
                           "\"{{upstream.<stage>.body}}\", or give a 'template' object")
    if inputs.get("parse_json_strings", True) and isinstance(data, str):
        data = parse_json_text(data)
    result, mapped, missing = _transform(inputs, data)
    return {"result": _without(result, inputs.get("exclude_fields")),
            "fields_mapped": mapped, "fields_missing": missing}


def _transform(inputs, data):
    expression = inputs.get("jmespath_expression")
    if expression:
        return jmespath_search(jmespath_steps(expression), data), 1, []
    mapping = inputs.get("mapping")
    if mapping:
        return _apply_mapping(mapping, inputs.get("defaults") or {}, data)
    if inputs.get("flatten"):
        result = flatten(data)
        return result, len(result), []
    return data, 0, []


def _apply_mapping(mapping, defaults, data):
    result, missing = {}, []
    for out_field, path in mapping.items():
        if not isinstance(path, str):
            raise MappingError("json_transform: mapping[{!r}] is {}; each mapping value must "
                               "be a path string such as 'user.tags[0]'".format(
                                   out_field, _short(path)))
        value = lookup_path(data, path)
        if value is None and out_field in defaults:
            value = defaults[out_field]
            missing.append(out_field)
        result[out_field] = value
    return result, len(mapping), missing


def _without(result, excluded):
    if not excluded or not isinstance(result, dict):
        return result
    return {key: value for key, value in result.items() if key not in excluded}


# -- filter ------------------------------------------------------------------------------

@component("filter", fields={
    "data": Field("any", required=True),
    "condition": Field("str?"),
    "field_conditions": Field("dict?"),
    "pass_if_missing": Field("bool", default=False),
    "filter_mode": Field("str", default="pass_fail"),
    "invert": Field("bool", default=False),
})
def filter_data(ctx):
    """Test ``data`` (pass_fail) or keep matching items of a list (filter_array).

    Output ``{passed, data, filtered_count, reason}``. Conditions are safe expressions over
    ``data`` (pass_fail) or ``item`` (filter_array). A condition that fails to evaluate
    counts as not passed (as passed with ``pass_if_missing``) and is logged. A filter never
    skips stages: use ``conditional`` or ``router`` to branch.
    """
    inputs = ctx.inputs
    mode = _choice("filter", "filter_mode", inputs.get("filter_mode") or "pass_fail",
                   ("pass_fail", "filter_array"))
    data = inputs.get("data")
    if mode == "filter_array" and isinstance(data, list):
        return _filter_array(ctx, inputs, data)
    if mode == "filter_array":
        ctx.log("warning", "filter_mode is filter_array but data is not a list; testing the "
                "whole value as in pass_fail mode", data_type=type(data).__name__)
    passed, reason = _test(ctx, inputs, data, "data")
    if inputs.get("invert"):
        passed, reason = not passed, "(inverted) " + reason
    return {"passed": passed, "data": data if passed else None, "filtered_count": 0,
            "reason": reason}


def _filter_array(ctx, inputs, items):
    kept = []
    keep_passed = not inputs.get("invert")
    condition = inputs.get("condition")
    evaluate = ctx.compiled(condition) if condition and isinstance(condition, str) else None
    for item in items:
        try:
            passed = bool(evaluate({"item": item})) if evaluate is not None else None
        except ExpressionError:
            passed = None     # tested again below, which logs and handles the error
        if passed is None:
            passed, _ = _test(ctx, inputs, item, "item", explain=False)
        if passed == keep_passed:
            kept.append(item)
    dropped = len(items) - len(kept)
    return {"passed": bool(kept), "data": kept, "filtered_count": dropped,
            "reason": "Filtered {} items, {} passed".format(dropped, len(kept))}


def _test(ctx, inputs, value, name, explain=True):
    """(passed, why); ``why`` only when ``explain`` (an array filter drops it)."""
    condition = inputs.get("condition")
    if condition:
        return _test_condition(ctx, condition, value, name, inputs.get("pass_if_missing"),
                               explain)
    conditions = inputs.get("field_conditions")
    if conditions:
        return _test_fields(conditions, value, inputs.get("pass_if_missing"))
    return True, "No conditions specified"


def _test_condition(ctx, condition, value, name, pass_if_missing, explain=True):
    try:
        result = ctx.evaluate(condition, {name: value})
    except ExpressionError as error:
        hint = ""
        if name == "item" and "'data'" in str(error):
            hint = " (in filter_array mode the variable is 'item', e.g. item.get('x') == 1)"
        ctx.log("warning", "filter condition failed to evaluate" + hint, error=str(error))
        if pass_if_missing:
            return True, "Expression error (pass_if_missing): {}{}".format(error, hint)
        return False, "Expression error: {}{}".format(error, hint)
    if not explain:
        return bool(result), None
    return bool(result), "Expression {!r} = {!r}".format(condition, result)


def _test_fields(conditions, value, pass_if_missing):
    if not isinstance(value, dict):
        return False, "Field conditions require dict data"
    for field, expected in conditions.items():
        if field not in value:
            if pass_if_missing:
                continue
            return False, "Missing field: {}".format(field)
        if value[field] != expected:
            return False, "Field {!r}: expected {!r}, got {!r}".format(field, expected,
                                                                      value[field])
    return True, "All field conditions matched"


# -- logger ------------------------------------------------------------------------------

_LEVELS = ("debug", "info", "warning", "error")
_LEVEL_ALIASES = {"warn": "warning", "critical": "error", "fatal": "error"}


@component("logger", fields={
    "message": Field("str", required=True),
    "level": Field("str", default="info"),
    "data": Field("any?"),
    "tags": Field("dict?"),
    "emit_to_trace": Field("bool", default=True),
    "passthrough": Field("any?"),
})
def logger(ctx):
    """Log a message to the run's log (and Python logging). Output ``{logged, log_id,
    passthrough}``.

    ``log_id``: the reference draws 8 random hex digits; fm-edge derives them from the run
    id, stage id, level, message and data, so a re-run of the same record gives the same
    id and outputs stay comparable. ``level`` also accepts warn/critical/fatal.
    """
    inputs = ctx.inputs
    level = _choice("logger", "level", inputs.get("level") or "info", _LEVELS, _LEVEL_ALIASES)
    message = inputs.get("message") or ""
    extra = {key: inputs[key] for key in ("data", "tags") if inputs.get(key) is not None}
    log_id = _log_id(ctx, level, message, extra)
    if inputs.get("emit_to_trace", True):
        ctx.log(level, message, log_id=log_id, **extra)   # the run's log, and the log file
    else:
        log.log(getattr(logging, level.upper()), "[%s] %s", log_id, message)
    return {"logged": True, "log_id": log_id, "passthrough": inputs.get("passthrough")}


def _log_id(ctx, level, message, extra):
    body = json.dumps(extra, sort_keys=True, default=str)
    text = "\0".join((str(ctx.run.run_id), str(ctx.stage_id), level, message, body))
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:8]


# -- loop (the batching operator) -------------------------------------------------------

@component("loop", fields={
    "items": Field("list", required=True),
    "batch_size": Field("int", default=1),
    "max_iterations": Field("int?"),
    "start_index": Field("int", default=0),
    "include_metadata": Field("bool", default=True),
})
def loop(ctx):
    """Split ``items`` into batches; it runs nothing (use ``foreach`` for that).

    Output ``{batches, total_items, total_batches, has_more, metadata}``; ``max_iterations``
    caps the number of batches, ``total_items`` counts items before ``start_index``.
    """
    inputs = ctx.inputs
    items = inputs.get("items") or []
    size = _in_range("loop", "batch_size", _given(inputs, "batch_size", 1), 1, 1000)
    limit = _in_range("loop", "max_iterations", inputs.get("max_iterations"), 1)
    start = _in_range("loop", "start_index", _given(inputs, "start_index", 0), 0)
    remaining = items[start:]
    count = len(range(0, len(remaining), size))
    if limit is not None:
        count = min(count, limit)
    batches = [remaining[i * size:(i + 1) * size] for i in range(count)]
    processed = sum(len(batch) for batch in batches) + start
    metadata = {}
    if inputs.get("include_metadata", True):
        metadata = {"start_index": start, "batch_size": size,
                    "items_processed": processed, "items_remaining": len(items) - processed}
    return {"batches": batches, "total_items": len(items), "total_batches": len(batches),
            "has_more": processed < len(items), "metadata": metadata}


# -- variable_set ------------------------------------------------------------------------

@component("variable_set", fields={
    "name": Field("str?"),
    "value": Field("any?"),
    "scope": Field("str", default="pipeline"),
    "overwrite": Field("bool", default=True),
    "extract_path": Field("str?"),
    "variables": Field("dict?"),
})
def variable_set(ctx):
    """Set run variables, readable as ``{{context.<name>}}`` by later stages.

    Output ``{name, value, previous_value, was_set, variables}``. Either ``name`` +
    ``value`` (``extract_path`` picks a part of the value), or (fm-edge, for the gallery)
    ``variables``: an object of several names; then ``value`` and ``previous_value`` are
    objects keyed by name. ``variables`` in the output always holds the values in effect,
    so ``{{upstream.<stage>.variables.<name>}}`` works in both forms. ``overwrite: false``
    keeps an existing value. ``scope`` is accepted and ignored, as in the reference.
    """
    inputs = ctx.inputs
    many = inputs.get("variables")
    if many is not None:
        if inputs.get("name") is not None:
            raise MappingError("variable_set: give either 'name' + 'value' or 'variables', "
                               "not both")
        return _set_many(ctx, many, inputs.get("overwrite", True))
    name = inputs.get("name")
    value = inputs.get("value")
    if not name or value is None:
        raise MappingError("variable_set: inputs 'name' and 'value' are required (got "
                           "name={!r}, value={!r}); or give 'variables': {{\"name\": value, "
                           "...}}".format(name, _short(value, 40)))
    if inputs.get("extract_path"):
        value = lookup_path(value, inputs["extract_path"])
    previous, effective, was_set = _set_one(ctx, name, value, inputs.get("overwrite", True))
    return {"name": name, "value": effective, "previous_value": previous,
            "was_set": was_set, "variables": {name: effective}}


def _set_many(ctx, values, overwrite):
    effective, previous, any_set = {}, {}, False
    for name, value in values.items():
        before, effective[name], was_set = _set_one(ctx, name, value, overwrite)
        any_set = any_set or was_set
        if before is not None:
            previous[name] = before
    return {"name": None, "value": dict(effective), "previous_value": previous,
            "was_set": any_set, "variables": effective}


def _set_one(ctx, name, value, overwrite):
    """Set ``name`` unless it exists and ``overwrite`` is false; (previous, effective, set)."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise MappingError("variable_set: variable name {!r} is not valid; use letters, "
                           "digits and '_', not starting with a digit (it becomes "
                           "{{{{context.<name>}}}})".format(name))
    variables = ctx.run.variables
    previous = variables.get(name)
    if name in variables and not overwrite:
        return previous, previous, False
    variables[name] = value
    return previous, value, True


# -- switch_router -----------------------------------------------------------------------

_COMPARISONS = ("equals", "contains", "regex", "greater_than", "less_than")


@component("switch_router", fields={
    "data": Field("any", required=True),
    "value_path": Field("str?"),
    "cases": Field("list", required=True),
    "default_route": Field("str?"),
    "comparison_mode": Field("str", default="equals"),
})
def switch_router(ctx):
    """Name the first case whose ``condition`` matches the value. Skips nothing.

    Output ``{matched_route, matched_case, value, data}``. Use ``router`` or
    ``conditional`` to actually branch.
    """
    inputs = ctx.inputs
    mode = _choice("switch_router", "comparison_mode",
                   inputs.get("comparison_mode") or "equals", _COMPARISONS)
    data = inputs.get("data")
    path = inputs.get("value_path")
    value = lookup_path(data, path) if path else data
    for index, case in enumerate(inputs.get("cases") or []):
        if not isinstance(case, dict) or "route" not in case:
            raise MappingError("switch_router: cases[{}] is {}; each case must be an object "
                               "like {{\"condition\": \"admin\", \"route\": \"admin_path\"}}"
                               .format(index, _short(case)))
        if _case_matches(value, case.get("condition"), mode, index):
            return {"matched_route": case["route"], "matched_case": case, "value": value,
                    "data": data}
    return {"matched_route": inputs.get("default_route"), "matched_case": None,
            "value": value, "data": data}


def _case_matches(value, condition, mode, index):
    if mode == "equals":
        return value == condition
    if mode == "contains":
        if isinstance(value, str) and isinstance(condition, str):
            return condition in value
        return isinstance(value, list) and condition in value
    if mode == "regex":
        return (isinstance(value, str) and isinstance(condition, str)
                and bool(_compile(condition, "switch_router: cases[{}].condition".format(
                    index)).search(value)))
    try:
        number, limit = float(value), float(condition)
    except (TypeError, ValueError):
        return False
    return number > limit if mode == "greater_than" else number < limit


def _compile(pattern, where, flags=0):
    try:
        return re.compile(pattern, flags)
    except re.error as error:
        raise MappingError("{} {!r} is not a valid regular expression: {}".format(
            where, pattern, error)) from None


# -- rule_checker --------------------------------------------------------------------------

BUILTIN_PATTERNS = {
    "ssn": r"\b\d{3}-\d{2}-\d{4}\b",
    "credit_card": r"\b(?:\d{4}[-\s]?){3}\d{4}\b",
    "email": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Z|a-z]{2,}\b",
    "phone_us": r"\b(?:\+1[-.\s]?)?\(?\d{3}\)?[-.\s]?\d{3}[-.\s]?\d{4}\b",
    "ip_address": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
    "aws_key": r"\bAKIA[0-9A-Z]{16}\b",
    "api_key": r"\b[a-zA-Z0-9_-]{32,}\b",
}
_THRESHOLDS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
_RULE_TYPES = ("regex", "threshold", "contains", "expression", "builtin")


@component("rule_checker", fields={
    "data": Field("dict", required=True),
    "rules": Field("list", required=True),
    "fail_fast": Field("bool", default=False),
    "include_passed": Field("bool", default=False),
})
def rule_checker(ctx):
    """Check ``data`` against compliance rules (regex, threshold, contains, expression,
    builtin PII patterns).

    Output ``{passed, violations, passed_rules, blocking_violations, warning_count,
    rules_checked, requires_approval}``; ``passed`` means no ``block`` violation.
    Differences from the reference, which fails open: a rule with an unknown type, operator
    or builtin pattern name, or an invalid regex, raises MappingError naming the rule; and
    a rule naming a ``field`` checks that field only (the reference searched every string
    when the field was missing).
    """
    inputs = ctx.inputs
    data = inputs.get("data") or {}
    rules = inputs.get("rules") or []
    summary = {"violations": [], "passed_rules": [], "blocking": 0, "warnings": 0,
               "approval": False}
    for index, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise MappingError("rule_checker: rules[{}] is {}; each rule is an object with "
                               "type, field, severity, action, message".format(
                                   index, _short(rule)))
        action = _record_rule(summary, rule, _rule_match(rule, data, index),
                              inputs.get("include_passed"))
        if action == "block" and inputs.get("fail_fast"):
            break
    return {"passed": summary["blocking"] == 0, "violations": summary["violations"],
            "passed_rules": summary["passed_rules"],
            "blocking_violations": summary["blocking"], "warning_count": summary["warnings"],
            "rules_checked": len(rules), "requires_approval": summary["approval"]}


def _record_rule(summary, rule, match, include_passed):
    """Add one rule's outcome to ``summary``; returns the violated action or None."""
    if match is None:
        if include_passed:
            summary["passed_rules"].append({"rule_id": rule.get("id", "unknown"),
                                            "rule_name": rule.get("name", "Unnamed Rule")})
        return None
    action = rule.get("action", "warn")
    summary["violations"].append({
        "rule_id": rule.get("id", "unknown"), "rule_name": rule.get("name", "Unnamed Rule"),
        "severity": rule.get("severity", "medium"), "action": action,
        "message": rule.get("message", "Rule violated"), "field": rule.get("field"),
        "matched_value": match[0]})
    if action == "block":
        summary["blocking"] += 1
    else:
        summary["warnings"] += 1
        summary["approval"] = summary["approval"] or action == "require_approval"
    return action


def _rule_match(rule, data, index):
    """``(matched_value,)`` when the rule is violated, else None."""
    kind = rule.get("type", "contains")
    where = "rule_checker: rules[{}] ({})".format(index, rule.get("id", "no id"))
    if kind not in _RULE_TYPES:
        raise MappingError("{}: type {!r} is not one of {}".format(
            where, kind, ", ".join(_RULE_TYPES)))
    if kind == "expression":
        return _expression_rule(rule.get("expression", ""), data, where)
    field = rule.get("field")
    value = lookup_path(data, field) if field else None
    if field and value is None:
        return None
    if kind == "threshold":
        return _threshold(rule.get("operator", ">"), value, rule.get("value", 0), where)
    text = str(value) if field else _all_text(data)
    if kind == "contains":
        return _contains(text, rule.get("keywords") or [], rule.get("case_sensitive", False))
    pattern = rule.get("pattern", "")
    if kind == "builtin":
        pattern = BUILTIN_PATTERNS.get(rule.get("pattern_name"))
        if pattern is None:
            raise MappingError("{}: pattern_name {!r} is not one of {}".format(
                where, rule.get("pattern_name"), ", ".join(sorted(BUILTIN_PATTERNS))))
    found = _compile(pattern, where + " pattern", re.IGNORECASE).search(text)
    return (found.group(),) if found else None


def _threshold(operator, value, limit, where):
    compare = _THRESHOLDS.get(operator)
    if compare is None:
        raise MappingError("{}: operator {!r} is not one of {}".format(
            where, operator, " ".join(_THRESHOLDS)))
    try:
        number = float(value)
        return (number,) if compare(number, float(limit)) else None
    except (TypeError, ValueError):
        return None   # not a number: the reference treats it as no violation


def _contains(text, keywords, case_sensitive):
    if not case_sensitive:
        text = text.lower()
    for keyword in keywords:
        if (str(keyword) if case_sensitive else str(keyword).lower()) in text:
            return (keyword,)
    return None


def _expression_rule(expression, data, where):
    """The reference's mini-language ``"<field> <op> <value>"``: numbers compare as numbers,
    anything else only with == and != as text."""
    parts = str(expression).split()
    if len(parts) < 3:
        return None
    field, operator, wanted = parts[0], parts[1], " ".join(parts[2:])
    value = lookup_path(data, field)
    if value is None:
        return None
    try:
        return _threshold(operator, float(value), float(wanted), where)
    except (TypeError, ValueError):
        pass
    if operator == "==" and str(value) == wanted or operator == "!=" and str(value) != wanted:
        return (value,)
    return None


def _all_text(data):
    texts = []
    stack = [data]
    while stack:
        current = stack.pop()
        if isinstance(current, str):
            texts.append(current)
        elif isinstance(current, dict):
            stack.extend(reversed(list(current.values())))
        elif isinstance(current, list):
            stack.extend(reversed(current))
    return " ".join(texts)


# -- break_loop / continue_loop, retry / timeout -----------------------------------------

@component("break_loop", fields={
    "condition": Field("bool", required=True),
    "result": Field("any?"),
    "message": Field("str?"),
})
def break_loop(ctx):
    """Raise BreakLoop when ``condition`` is true (``foreach`` stops iterating); else
    output ``{broken: false, result: null, message: null}``."""
    if ctx.inputs.get("condition"):
        raise BreakLoop(ctx.inputs.get("message"), ctx.inputs.get("result"))
    return {"broken": False, "result": None, "message": None}


@component("continue_loop", fields={
    "condition": Field("bool", required=True),
    "message": Field("str?"),
})
def continue_loop(ctx):
    """Raise ContinueLoop when ``condition`` is true (``foreach`` ends this iteration);
    else output ``{continued: false, message: null}``."""
    if ctx.inputs.get("condition"):
        raise ContinueLoop(ctx.inputs.get("message"))
    return {"continued": False, "message": None}


@component("retry", fields={
    "task": Field("any", required=True),
    "max_retries": Field("int", default=3),
    "initial_delay": Field("float", default=1.0),
    "backoff_multiplier": Field("float", default=2.0),
    "max_delay": Field("float", default=30.0),
    "retry_on": Field("list?"),
})
def retry(ctx):
    """Pass-through, as in the reference for a JSON ``task``: there is nothing to call.

    Output ``{success: true, result: <task>, attempts: 1, errors: [], exhausted: false}``.
    Real retries belong in the stage's ``retry_config``.
    """
    inputs = ctx.inputs
    _in_range("retry", "max_retries", inputs.get("max_retries"), 0, 10)
    _in_range("retry", "initial_delay", inputs.get("initial_delay"), 0.0)
    _in_range("retry", "backoff_multiplier", inputs.get("backoff_multiplier"), 1.0)
    _in_range("retry", "max_delay", inputs.get("max_delay"), 0.1)
    return {"success": True, "result": inputs.get("task"), "attempts": 1, "errors": [],
            "exhausted": False}


@component("timeout", fields={
    "task": Field("any", required=True),
    "timeout": Field("float", required=True),
    "fallback_task": Field("any?"),
    "warn_at": Field("float", default=80.0),
    "raise_on_timeout": Field("bool", default=True),
})
def timeout(ctx):
    """Pass-through, as in the reference for a JSON ``task``: it completes at once.

    Output ``{success: true, timed_out: false, elapsed: 0.0, timeout_value, result: <task>,
    warning, percent_elapsed: 0.0}``. Real limits belong in the stage's ``timeout_ms``.
    """
    inputs = ctx.inputs
    limit = inputs.get("timeout")
    if limit is None or not limit > 0:
        raise MappingError("timeout: input 'timeout' must be a number of seconds above 0 "
                           "(got {!r})".format(limit))
    warn_at = _in_range("timeout", "warn_at", _given(inputs, "warn_at", 80.0), 0.0, 100.0)
    return {"success": True, "timed_out": False, "elapsed": 0.0, "timeout_value": limit,
            "result": inputs.get("task"), "warning": 0.0 >= warn_at,
            "percent_elapsed": 0.0}


# -- echo_connector ----------------------------------------------------------------------

@component("echo_connector", fields={
    "operation": Field("str", required=True),
    "data": Field("any?"),
    "metadata": Field("dict?"),
})
def echo_connector(ctx):
    """Echo ``data`` back: ``{success, operation, echoed_data, metadata, error}``; the
    metadata gains ``connection_id``, ``connector_type`` and ``timestamp`` (the run id, as
    in the reference)."""
    inputs = ctx.inputs
    metadata = dict(inputs.get("metadata") or {})
    metadata.update({"connection_id": "conn_12345", "connector_type": "echo",
                     "timestamp": ctx.run.run_id})
    return {"success": True, "operation": inputs.get("operation"),
            "echoed_data": inputs.get("data"), "metadata": metadata, "error": None}


# -- schema_validate (a JSON Schema Draft 7 validator) -----------------------------------

@component("schema_validate", fields={
    "data": Field("any?", required=True),
    "json_schema": Field("dict?"),
    "schema": Field("dict?"),
    "strict": Field("bool", default=True),
    "coerce_types": Field("bool", default=False),
    "collect_all_errors": Field("bool", default=True),
})
def schema_validate(ctx):
    """Validate ``data`` against ``json_schema`` (``schema`` is accepted too: the gallery
    uses it). Output ``{valid, data, errors, error_count}``; invalid data is not an error.

    Each error is ``{path, message, validator, validator_value}`` as jsonschema reports
    them. Draft 7 keywords are checked except ``format`` (an annotation, as jsonschema does
    by default) and remote ``$ref`` (refused); local ``#/...`` refs work. ``coerce_types``
    converts strings/numbers/booleans to the schema's scalar types first, only when the
    conversion is exact ("3" -> 3, "true" -> true). ``strict`` is ignored, as in the
    reference.
    """
    inputs = ctx.inputs
    schema = _pick_schema(inputs)
    data = inputs.get("data")
    if inputs.get("coerce_types"):
        data = coerce_to_schema(data, schema)
    limit = None if inputs.get("collect_all_errors", True) else 1
    errors = SchemaChecker(schema).errors(data, limit)
    return {"valid": not errors, "data": data, "errors": errors, "error_count": len(errors)}


def _pick_schema(inputs):
    primary, alias = inputs.get("json_schema"), inputs.get("schema")
    if primary is not None and alias is not None and primary != alias:
        raise MappingError("schema_validate: both 'json_schema' and 'schema' are given and "
                           "differ; keep one ('schema' is an alias of 'json_schema')")
    schema = primary if primary is not None else alias
    if schema is None:
        raise MappingError("schema_validate: input 'json_schema' is required; give the JSON "
                           "Schema object, e.g. {\"type\": \"object\", \"required\": "
                           "[\"id\"]} ('schema' works too)")
    return schema


_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def json_type_matches(value, type_name):
    """JSON Schema's types over Python values: booleans are not numbers; 1.0 is an integer."""
    if type_name in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return type_name == "number" or isinstance(value, int) or value.is_integer()
    expected = {"object": dict, "array": list, "string": str, "boolean": bool,
                "null": type(None)}.get(type_name)
    return expected is not None and isinstance(value, expected)


def coerce_to_schema(data, schema):
    """Exact conversions toward the schema's ``type``: recursive into properties/items."""
    if not isinstance(schema, dict):
        return data
    kind = schema.get("type")
    if kind == "object" and isinstance(data, dict):
        properties = schema.get("properties") or {}
        return {key: coerce_to_schema(value, properties.get(key)) for key, value in
                data.items()}
    if kind == "array" and isinstance(data, list):
        items = schema.get("items")
        return [coerce_to_schema(item, items) for item in data]
    converter = _SCALAR_COERCIONS.get(kind)
    return converter(data) if converter else data


def _to_integer(value):
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        return int(number) if math.isfinite(number) and number.is_integer() else value
    return value


def _to_number(value):
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value else number
    return value


def _to_boolean(value):
    words = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    return value


def _to_string(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, (int, float)) else value


_SCALAR_COERCIONS = {"integer": _to_integer, "number": _to_number, "boolean": _to_boolean,
                     "string": _to_string}


class SchemaChecker:
    """Validate values against one JSON Schema (Draft 7); ``errors(value)`` lists them all."""

    def __init__(self, schema):
        self.root = schema

    def errors(self, value, limit=None):
        """Every error (the first ``limit`` when given), in schema keyword order."""
        try:
            return list(itertools.islice(self._check(value, self.root, []), limit))
        except RecursionError:
            raise ComponentError("schema_validate: the data or the schema is nested too "
                                 "deeply (or a $ref refers to itself without descending); "
                                 "flatten it") from None

    def _check(self, value, schema, path):
        if schema is True or schema is None:
            return
        if schema is False:
            yield _schema_error(path, "False schema does not allow {}".format(_short(value)),
                                "false", False)
            return
        if not isinstance(schema, dict):
            raise MappingError("schema_validate: a schema must be an object or true/false, "
                               "got {} at {}".format(_short(schema), _where(path)))
        if "$ref" in schema:   # Draft 7: siblings of $ref are ignored
            yield from self._check(value, self._resolve(schema["$ref"]), path)
            return
        for keyword, expected in schema.items():
            check = _KEYWORDS.get(keyword)
            if check is not None:
                yield from check(self, value, expected, schema, path)

    def _resolve(self, ref):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ComponentError("schema_validate: $ref {!r} points outside the schema; "
                                 "fm-edge resolves only local references such as "
                                 "'#/definitions/address' (inline the referenced schema)"
                                 .format(ref))
        target = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = _step(target, part) if isinstance(target, list) else (
                target.get(part) if isinstance(target, dict) else None)
            if target is None:
                raise ComponentError("schema_validate: $ref {!r} does not resolve inside "
                                     "the schema".format(ref))
        return target

    def _sub(self, value, schema, path):
        """True when ``value`` is valid under ``schema`` (for anyOf/oneOf/not/if)."""
        return next(iter(self._check(value, schema, path)), None) is None


def _where(path):
    return "/" + "/".join(str(part) for part in path) if path else "the top level"


def _schema_error(path, message, keyword, expected):
    return {"path": list(path), "message": message, "validator": keyword,
            "validator_value": expected}


def _k_type(checker, value, expected, schema, path):
    names = expected if isinstance(expected, list) else [expected]
    unknown = [name for name in names if name not in _JSON_TYPES]
    if unknown:
        raise MappingError("schema_validate: type {!r} at {} is not a JSON Schema type; use "
                           "one of {}".format(unknown[0], _where(path), ", ".join(_JSON_TYPES)))
    if not any(json_type_matches(value, name) for name in names):
        yield _schema_error(path, "{!r} is not of type {}".format(
            value, ", ".join(repr(name) for name in names)), "type", expected)


def _k_enum(checker, value, expected, schema, path):
    if not any(_json_equal(value, option) for option in expected or []):
        yield _schema_error(path, "{!r} is not one of {!r}".format(value, expected), "enum",
                            expected)


def _k_const(checker, value, expected, schema, path):
    if not _json_equal(value, expected):
        yield _schema_error(path, "{!r} was expected".format(expected), "const", expected)


def _json_equal(a, b):
    """Equality as JSON sees it: true is not 1, and containers compare deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def _number_bound(keyword, fails, text):
    def check(checker, value, expected, schema, path):
        if json_type_matches(value, "number") and json_type_matches(expected, "number") \
                and fails(value, expected):
            yield _schema_error(path, "{!r} {} {!r}".format(value, text, expected), keyword,
                                expected)
    return check


def _k_multiple_of(checker, value, expected, schema, path):
    if json_type_matches(value, "number") and json_type_matches(expected, "number") \
            and expected > 0:
        quotient = value / expected
        if not (math.isfinite(quotient) and quotient == int(quotient)):
            yield _schema_error(path, "{!r} is not a multiple of {!r}".format(value, expected),
                                "multipleOf", expected)


def _size_bound(keyword, kind, fails, text):
    def check(checker, value, expected, schema, path):
        if json_type_matches(value, kind) and fails(len(value), expected):
            yield _schema_error(path, "{!r} {}".format(value, text), keyword, expected)
    return check


def _k_pattern(checker, value, expected, schema, path):
    if isinstance(value, str) and not _compile(expected, "schema_validate: pattern at " +
                                               _where(path)).search(value):
        yield _schema_error(path, "{!r} does not match {!r}".format(value, expected),
                            "pattern", expected)


def _k_required(checker, value, expected, schema, path):
    if isinstance(value, dict):
        for name in expected or []:
            if name not in value:
                yield _schema_error(path, "{!r} is a required property".format(name),
                                    "required", expected)


def _k_properties(checker, value, expected, schema, path):
    if isinstance(value, dict):
        for name, subschema in (expected or {}).items():
            if name in value:
                yield from checker._check(value[name], subschema, path + [name])


def _k_pattern_properties(checker, value, expected, schema, path):
    if isinstance(value, dict):
        for pattern, subschema in (expected or {}).items():
            regex = _compile(pattern, "schema_validate: patternProperties at " + _where(path))
            for name in value:
                if regex.search(name):
                    yield from checker._check(value[name], subschema, path + [name])


def _k_additional_properties(checker, value, expected, schema, path):
    if not isinstance(value, dict):
        return
    known = schema.get("properties") or {}
    patterns = [_compile(p, "schema_validate: patternProperties at " + _where(path))
                for p in (schema.get("patternProperties") or {})]
    extras = [name for name in value
              if name not in known and not any(p.search(name) for p in patterns)]
    if expected is False and extras:
        verb = "was" if len(extras) == 1 else "were"
        yield _schema_error(path, "Additional properties are not allowed ({} {} unexpected)"
                            .format(", ".join(repr(e) for e in extras), verb),
                            "additionalProperties", expected)
    elif isinstance(expected, dict):
        for name in extras:
            yield from checker._check(value[name], expected, path + [name])


def _k_property_names(checker, value, expected, schema, path):
    if isinstance(value, dict):
        for name in value:
            yield from checker._check(name, expected, path)


def _k_dependencies(checker, value, expected, schema, path):
    if not isinstance(value, dict):
        return
    for name, dependency in (expected or {}).items():
        if name not in value:
            continue
        if isinstance(dependency, list):
            for other in dependency:
                if other not in value:
                    yield _schema_error(path, "{!r} is a dependency of {!r}".format(
                        other, name), "dependencies", expected)
        else:
            yield from checker._check(value, dependency, path)


def _k_items(checker, value, expected, schema, path):
    if not isinstance(value, list):
        return
    if isinstance(expected, list):
        for index, (item, subschema) in enumerate(zip(value, expected)):
            yield from checker._check(item, subschema, path + [index])
    else:
        for index, item in enumerate(value):
            yield from checker._check(item, expected, path + [index])


def _k_additional_items(checker, value, expected, schema, path):
    tuple_items = schema.get("items")
    if not isinstance(value, list) or not isinstance(tuple_items, list):
        return
    extra = value[len(tuple_items):]
    if expected is False and extra:
        yield _schema_error(path, "Additional items are not allowed ({} unexpected)".format(
            ", ".join(repr(item) for item in extra)), "additionalItems", expected)
    elif isinstance(expected, dict):
        for offset, item in enumerate(extra):
            yield from checker._check(item, expected, path + [len(tuple_items) + offset])


def _k_unique_items(checker, value, expected, schema, path):
    if expected is True and isinstance(value, list):
        for index, item in enumerate(value):
            if any(_json_equal(item, other) for other in value[index + 1:]):
                yield _schema_error(path, "{!r} has non-unique elements".format(value),
                                    "uniqueItems", expected)
                return


def _k_contains(checker, value, expected, schema, path):
    if isinstance(value, list) and not any(checker._sub(item, expected, path)
                                           for item in value):
        yield _schema_error(path, "None of {!r} are valid under the given schema".format(
            value), "contains", expected)


def _k_all_of(checker, value, expected, schema, path):
    for subschema in expected or []:
        yield from checker._check(value, subschema, path)


def _k_any_of(checker, value, expected, schema, path):
    if not any(checker._sub(value, subschema, path) for subschema in expected or []):
        yield _schema_error(path, "{!r} is not valid under any of the given schemas".format(
            value), "anyOf", expected)


def _k_one_of(checker, value, expected, schema, path):
    matches = sum(1 for subschema in expected or [] if checker._sub(value, subschema, path))
    if matches != 1:
        text = "is not valid under any of" if matches == 0 else "is valid under each of"
        yield _schema_error(path, "{!r} {} the given schemas".format(value, text), "oneOf",
                            expected)


def _k_not(checker, value, expected, schema, path):
    if checker._sub(value, expected, path):
        yield _schema_error(path, "{!r} should not be valid under {!r}".format(
            value, expected), "not", expected)


def _k_if(checker, value, expected, schema, path):
    branch = "then" if checker._sub(value, expected, path) else "else"
    if branch in schema:
        yield from checker._check(value, schema[branch], path)


_KEYWORDS = {
    "type": _k_type, "enum": _k_enum, "const": _k_const,
    "minimum": _number_bound("minimum", lambda v, m: v < m, "is less than the minimum of"),
    "maximum": _number_bound("maximum", lambda v, m: v > m, "is greater than the maximum of"),
    "exclusiveMinimum": _number_bound("exclusiveMinimum", lambda v, m: v <= m,
                                      "is less than or equal to the minimum of"),
    "exclusiveMaximum": _number_bound("exclusiveMaximum", lambda v, m: v >= m,
                                      "is greater than or equal to the maximum of"),
    "multipleOf": _k_multiple_of,
    "minLength": _size_bound("minLength", "string", lambda n, m: n < m, "is too short"),
    "maxLength": _size_bound("maxLength", "string", lambda n, m: n > m, "is too long"),
    "minItems": _size_bound("minItems", "array", lambda n, m: n < m, "is too short"),
    "maxItems": _size_bound("maxItems", "array", lambda n, m: n > m, "is too long"),
    "minProperties": _size_bound("minProperties", "object", lambda n, m: n < m,
                                 "does not have enough properties"),
    "maxProperties": _size_bound("maxProperties", "object", lambda n, m: n > m,
                                 "has too many properties"),
    "pattern": _k_pattern, "required": _k_required, "properties": _k_properties,
    "patternProperties": _k_pattern_properties,
    "additionalProperties": _k_additional_properties, "propertyNames": _k_property_names,
    "dependencies": _k_dependencies, "items": _k_items, "additionalItems": _k_additional_items,
    "uniqueItems": _k_unique_items, "contains": _k_contains, "allOf": _k_all_of,
    "anyOf": _k_any_of, "oneOf": _k_one_of, "not": _k_not, "if": _k_if,
}
