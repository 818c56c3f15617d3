"""Transformers over lists of records, in pure Python (semantics §4.5).

The reference builds these on pandas; fm-edge computes the same results with the
standard library. As in the reference, a problem with the data or the specification is
reported in the output (``success: false`` and ``error``), not raised, so a pipeline can
test ``success``; only inputs of the wrong shape (records that are not objects) fail the
stage. Differences from pandas are listed on each component.
"""

import json
import math
import time

from ...errors import ExpressionError
from . import component
from .base import Field, MappingError

# A join larger than this is almost always a missing key (a cross product by accident);
# building it would exhaust a small device's memory.
MAX_JOIN_ROWS = 1000000

_FUNC_ALIASES = {"avg": "mean", "stddev": "std", "variance": "var", "nunique": "distinct"}
_FUNCS = ("sum", "count", "min", "max", "mean", "std", "var", "distinct", "median",
          "percentile", "first", "last")
_JOIN_TYPES = ("inner", "left", "right", "outer", "full_outer", "cross")


class _Failure(Exception):
    """A data or specification problem, reported as ``success: false``."""


def _records(type_name, field, rows):
    if not isinstance(rows, list):
        raise MappingError("{}: {} must be a list of records (objects), got {}".format(
            type_name, field, type(rows).__name__))
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise MappingError("{}: {}[{}] is {!r}; every record must be an object such as "
                               "{{\"id\": 1, \"value\": 10}}".format(type_name, field, index,
                                                                      row))
    return rows


def _columns(rows):
    """Every key used by any record, in order of first appearance (pandas' columns)."""
    seen = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _hashable(value):
    """A dict key for any JSON value: objects and arrays by their canonical JSON."""
    if isinstance(value, (dict, list)):
        return ("json", json.dumps(value, sort_keys=True, default=str))
    return value


def _elapsed_ms(started):
    return int((time.monotonic() - started) * 1000)


# -- aggregate -----------------------------------------------------------------------------

@component("aggregate", fields={
    "data": Field("list", required=True),
    "aggregations": Field("list", required=True),
    "group_by": Field("list?"),
    "having": Field("str?"),
})
def aggregate(ctx):
    """Aggregate records, optionally per group. Output ``{success, data, row_count,
    metadata, error}``.

    ``aggregations``: ``[{field, func, alias?, percentile?}]`` with func sum, count, min,
    max, avg/mean, std/stddev, var/variance (sample, like pandas), distinct/nunique,
    median, percentile (linear, ``percentile`` 0-100, default 50), first, last; ``alias``
    defaults to ``<field>_<func>``. Nulls and missing values are skipped, as pandas does
    (first/last give the first/last non-null value); ``count`` without a field counts rows.
    Groups with a null key are dropped and groups come out sorted by key, as in pandas.
    ``having`` is a safe expression evaluated on each result row, with the row's fields as
    names (``total > 100 and n >= 2``) and the whole row as ``row`` (for keys that are not
    names); the reference used a pandas query string, which reads the same for these cases.
    Empty ``data`` is fine (the reference failed on it).
    """
    started = time.monotonic()
    inputs = ctx.inputs
    rows = _records("aggregate", "data", inputs.get("data"))
    group_by = inputs.get("group_by")
    if isinstance(group_by, str):
        group_by = [group_by]   # what list coercion makes of "region"
    try:
        specs = [_agg_spec(spec, index) for index, spec in
                 enumerate(inputs.get("aggregations") or [])]
        result = _grouped(rows, group_by, specs) if group_by else [_aggregate_rows(rows,
                                                                                   specs)]
        if inputs.get("having"):
            result = _having(ctx, inputs["having"], result)
    except _Failure as failure:
        ctx.log("warning", "aggregate failed", error=str(failure))
        return {"success": False, "data": None, "row_count": None,
                "metadata": {"execution_time_ms": _elapsed_ms(started)}, "error": str(failure)}
    return {"success": True, "data": result, "row_count": len(result), "error": None,
            "metadata": {"execution_time_ms": _elapsed_ms(started), "input_rows": len(rows),
                         "output_rows": len(result), "aggregations": len(specs),
                         "grouped": bool(group_by)}}


def _agg_spec(spec, index):
    if not isinstance(spec, dict):
        raise _Failure("aggregations[{}] is {!r}; write {{\"field\": \"amount\", \"func\": "
                       "\"sum\"}}".format(index, spec))
    func = str(spec.get("func", "")).strip().lower()
    func = _FUNC_ALIASES.get(func, func)
    if func not in _FUNCS:
        raise _Failure("aggregations[{}]: unknown func {!r}; use one of sum, count, min, max, "
                       "avg, mean, std, var, distinct, median, percentile, first, last"
                       .format(index, spec.get("func")))
    field = spec.get("field")
    if field in (None, "", "*") and func != "count":
        raise _Failure("aggregations[{}]: 'field' is required for {}".format(index, func))
    field = None if field in ("", "*") else field
    alias = spec.get("alias") or ("{}_{}".format(field, spec.get("func")) if field is not None
                                  else "count")
    return {"field": field, "func": func, "alias": alias,
            "percentile": spec.get("percentile", 50)}


def _grouped(rows, group_by, specs):
    for field in group_by:
        if rows and all(field not in row for row in rows):
            raise _Failure("group_by field {!r} is not in the data (fields: {})".format(
                field, ", ".join(map(str, _columns(rows)))))
    groups = {}
    for row in rows:
        values = tuple(row.get(field) for field in group_by)
        if any(value is None for value in values):
            continue   # pandas drops groups whose key is null
        key = tuple(_hashable(value) for value in values)
        groups.setdefault(key, (values, []))[1].append(row)
    ordered = list(groups.values())
    try:
        ordered.sort(key=lambda group: group[0])
    except TypeError:
        pass   # keys of mixed types cannot be ordered: keep first-appearance order
    return [dict(zip(group_by, values), **_aggregate_rows(members, specs))
            for values, members in ordered]


def _aggregate_rows(rows, specs):
    result = {}
    for spec in specs:
        field = spec["field"]
        if field is None:
            result[spec["alias"]] = len(rows)
            continue
        if rows and all(field not in row for row in rows):
            raise _Failure("field {!r} is not in the data (fields: {})".format(
                field, ", ".join(map(str, _columns(rows)))))
        values = [row.get(field) for row in rows if row.get(field) is not None]
        result[spec["alias"]] = _AGGREGATORS[spec["func"]](values, spec)
    return result


def _numbers(values, spec):
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Failure("{} of field {!r}: {!r} is not a number".format(
                spec["func"], spec["field"], value))
    return values


def _extreme(pick):
    def run(values, spec):
        if not values:
            return None
        try:
            return pick(values)
        except TypeError:
            raise _Failure("{} of field {!r}: values of different types cannot be compared "
                           "({})".format(spec["func"], spec["field"],
                                         ", ".join(sorted({type(v).__name__ for v in values})))
                           ) from None
    return run


def _mean(values, spec):
    numbers = _numbers(values, spec)
    return math.fsum(numbers) / len(numbers) if numbers else None


def _variance(values, spec):
    numbers = _numbers(values, spec)
    if len(numbers) < 2:
        return None   # the sample variance needs two values (pandas gives NaN)
    mean = math.fsum(numbers) / len(numbers)
    return math.fsum((x - mean) ** 2 for x in numbers) / (len(numbers) - 1)


def _std(values, spec):
    variance = _variance(values, spec)
    return None if variance is None else math.sqrt(variance)


def _quantile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * fraction
    low = int(math.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _percentile(values, spec):
    percent = spec["percentile"]
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) \
            or not 0 <= percent <= 100:
        raise _Failure("percentile of field {!r}: 'percentile' must be a number from 0 to "
                       "100, got {!r}".format(spec["field"], percent))
    return _quantile(_numbers(values, spec), percent / 100.0)


def _distinct(values, spec):
    return len({_hashable(value) for value in values})


def _sum(values, spec):
    numbers = _numbers(values, spec)
    if all(isinstance(x, int) for x in numbers):
        return sum(numbers)
    return math.fsum(numbers)


_AGGREGATORS = {
    "sum": _sum,
    "count": lambda values, spec: len(values),
    "min": _extreme(min), "max": _extreme(max),
    "mean": _mean, "std": _std, "var": _variance, "distinct": _distinct,
    "median": lambda values, spec: _quantile(_numbers(values, spec), 0.5),
    "percentile": _percentile,
    "first": lambda values, spec: values[0] if values else None,
    "last": lambda values, spec: values[-1] if values else None,
}


def _having(ctx, expression, rows):
    kept = []
    for row in rows:
        names = {key: value for key, value in row.items()
                 if isinstance(key, str) and key.isidentifier()}
        names["row"] = row
        try:
            if ctx.evaluate(expression, names):
                kept.append(row)
        except ExpressionError as error:
            raise _Failure("having {!r}: {}".format(expression, error)) from None
    return kept


# -- join ----------------------------------------------------------------------------------

@component("join", fields={
    "left_data": Field("list", required=True),
    "right_data": Field("list", required=True),
    "left_on": Field("any", required=True),
    "right_on": Field("any", required=True),
    "join_type": Field("str", default="inner"),
    "suffixes": Field("list", default=lambda: ["_left", "_right"]),
})
def join(ctx):
    """SQL-style join of two record lists. Output ``{success, data, row_count, columns,
    metadata, error}``.

    ``left_on``/``right_on``: a field name or a list (composite key). Key fields with the
    same name on both sides appear once; other fields present on both sides get
    ``suffixes``. Every output record has every column (null where a side had no match).
    Order: inner/left follow the left records, right follows the right records,
    outer/full_outer give the left join then the unmatched right records (pandas sorts outer
    joins by key). Null keys never match (pandas matches null with null). A key field no
    record has gives ``success: false``; an empty side is fine. Results above
    ``MAX_JOIN_ROWS`` rows are refused.
    """
    started = time.monotonic()
    inputs = ctx.inputs
    left = _records("join", "left_data", inputs.get("left_data"))
    right = _records("join", "right_data", inputs.get("right_data"))
    join_type = str(inputs.get("join_type") or "inner").strip().lower()
    try:
        plan = _join_plan(inputs, join_type, left, right)
        rows = _join_rows(plan, left, right)
    except _Failure as failure:
        ctx.log("warning", "join failed", error=str(failure))
        return {"success": False, "data": None, "row_count": None, "columns": None,
                "error": str(failure), "metadata": {"execution_time_ms": _elapsed_ms(started),
                                                    "join_type": join_type}}
    return {"success": True, "data": rows, "row_count": len(rows), "columns": plan["columns"],
            "error": None,
            "metadata": {"execution_time_ms": _elapsed_ms(started), "join_type": join_type,
                         "left_rows": len(left), "right_rows": len(right),
                         "output_rows": len(rows), "left_on": plan["left_on"],
                         "right_on": plan["right_on"]}}


def _key_list(value, field):
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k
                                                          for k in keys):
        raise _Failure("{} must be a field name or a list of field names, got {!r}".format(
            field, value))
    return keys


def _join_plan(inputs, join_type, left, right):
    """Everything about the join except the rows: keys, output column names."""
    if join_type not in _JOIN_TYPES:
        raise _Failure("Invalid join type: {!r}. Must be one of: {}".format(
            join_type, ", ".join(_JOIN_TYPES)))
    left_on = _key_list(inputs.get("left_on"), "left_on")
    right_on = _key_list(inputs.get("right_on"), "right_on")
    if len(left_on) != len(right_on):
        raise _Failure("left_on has {} fields and right_on {}; give the same number".format(
            len(left_on), len(right_on)))
    suffixes = inputs.get("suffixes") or ["_left", "_right"]
    if len(suffixes) != 2 or not all(isinstance(s, str) for s in suffixes):
        raise _Failure("suffixes must be two strings such as [\"_left\", \"_right\"], got "
                       "{!r}".format(suffixes))
    left_columns, right_columns = _columns(left), _columns(right)
    if join_type != "cross":
        _check_keys("Left", left_on, left, left_columns)
        _check_keys("Right", right_on, right, right_columns)
    merged = set() if join_type == "cross" else {
        l_key for l_key, r_key in zip(left_on, right_on) if l_key == r_key}
    right_columns = [c for c in right_columns if c not in merged]
    overlap = set(left_columns) & set(right_columns)
    left_names = {c: c + suffixes[0] if c in overlap else c for c in left_columns}
    right_names = {c: c + suffixes[1] if c in overlap else c for c in right_columns}
    return {"type": join_type, "left_on": left_on, "right_on": right_on, "merged": merged,
            "left_names": left_names, "right_names": right_names,
            "columns": list(left_names.values()) + list(right_names.values())}


def _check_keys(side, keys, rows, columns):
    missing = [key for key in keys if key not in columns]
    if rows and missing:
        raise _Failure("{} join keys not found in {} dataset: {} (its fields: {})".format(
            side, side.lower(), missing, ", ".join(map(str, columns))))


def _join_rows(plan, left, right):
    kind = plan["type"]
    if kind == "cross":
        _check_size(len(left) * len(right))
        return [_combine(plan, l_row, r_row) for l_row in left for r_row in right]
    if kind == "right":
        matches = _matches(right, plan["right_on"], left, plan["left_on"])
        _check_size(sum(len(found) or 1 for _, found in matches))
        return [_combine(plan, l_row, r_row) for r_row, found in matches
                for l_row in (found or [None])]
    matches = _matches(left, plan["left_on"], right, plan["right_on"])
    unmatched_right = []
    if kind in ("outer", "full_outer"):
        used = {id(r_row) for _, found in matches for r_row in found}
        unmatched_right = [r_row for r_row in right if id(r_row) not in used]
    keep_lonely = kind != "inner"   # left rows without a match stay, with null right fields
    _check_size(sum(len(found) or int(keep_lonely) for _, found in matches)
                + len(unmatched_right))
    rows = [_combine(plan, l_row, r_row) for l_row, found in matches
            for r_row in (found or ([None] if keep_lonely else []))]
    return rows + [_combine(plan, None, r_row) for r_row in unmatched_right]


def _matches(outer, outer_keys, inner, inner_keys):
    """``[(outer_row, [inner rows with the same key])]`` in outer order."""
    index = _index(inner, inner_keys)
    return [(row, index.get(_row_key(row, outer_keys)) or []) for row in outer]


def _check_size(count):
    if count > MAX_JOIN_ROWS:
        raise _Failure("the join would produce {} rows, more than fm-edge's limit of {}; "
                       "check the join keys (a key shared by many records multiplies rows) "
                       "or filter the data first".format(count, MAX_JOIN_ROWS))


def _row_key(row, keys):
    values = tuple(row.get(key) for key in keys)
    return None if any(v is None for v in values) else tuple(_hashable(v) for v in values)


def _index(rows, keys):
    index = {}
    for row in rows:
        key = _row_key(row, keys)
        if key is not None:
            index.setdefault(key, []).append(row)
    return index


def _combine(plan, l_row, r_row):
    out = {}
    for column, name in plan["left_names"].items():
        value = l_row.get(column) if l_row is not None else None
        if l_row is None and column in plan["merged"]:
            value = r_row.get(plan["right_on"][plan["left_on"].index(column)])
        out[name] = value
    for column, name in plan["right_names"].items():
        out[name] = r_row.get(column) if r_row is not None else None
    return out


# -- filter_transformer ------------------------------------------------------------------

@component("filter_transformer", fields={
    "data": Field("list", required=True),
    "field": Field("str", required=True),
    "value": Field("any?", required=True),
})
def filter_transformer(ctx):
    """Keep the records whose ``field`` equals ``value``. Output ``{data, rows_processed,
    rows_filtered (rows kept), stats: {field, value, filter_rate}}``."""
    inputs = ctx.inputs
    rows = _records("filter_transformer", "data", inputs.get("data"))
    field, wanted = inputs.get("field"), inputs.get("value")
    kept = [row for row in rows if row.get(field) == wanted]
    rate = len(kept) / len(rows) if rows else 0
    return {"data": kept, "rows_processed": len(rows), "rows_filtered": len(kept),
            "stats": {"field": field, "value": wanted, "filter_rate": rate}}
