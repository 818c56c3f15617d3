"""aggregate, join and filter_transformer in pure Python (semantics §4.5)."""

import math
import re

import pytest

from fmedge.pipeline.components.base import MappingError
from fmedge.pipeline.components.transform import MAX_JOIN_ROWS
from tests.component_harness import call_component, make_context, run_context

SALES = [
    {"region": "north", "product": "a", "amount": 10, "units": 1},
    {"region": "south", "product": "a", "amount": 30, "units": 3},
    {"region": "north", "product": "b", "amount": 20, "units": None},
    {"region": "north", "product": "a", "amount": 60},
    {"region": None, "product": "c", "amount": 5, "units": 2},
]


def aggregate(data, aggregations, **more):
    return call_component("aggregate", dict(data=data, aggregations=aggregations, **more))


# -- aggregate ------------------------------------------------------------------------------

def test_aggregate_global_functions():
    out = aggregate(SALES, [
        {"func": "sum", "field": "amount", "alias": "total"},
        {"func": "count", "field": "units"},
        {"func": "avg", "field": "amount"},
        {"func": "min", "field": "amount"}, {"func": "max", "field": "product"},
        {"func": "median", "field": "amount"},
        {"func": "percentile", "field": "amount", "percentile": 25, "alias": "p25"},
        {"func": "nunique", "field": "region"},
        {"func": "first", "field": "units"}, {"func": "last", "field": "units"},
        {"func": "count", "alias": "rows"},
    ])
    assert sorted(out) == ["data", "error", "metadata", "row_count", "success"]
    assert out["success"] is True and out["error"] is None and out["row_count"] == 1
    row = out["data"][0]
    assert row == {"total": 125, "units_count": 3, "amount_avg": 25.0, "amount_min": 5,
                   "product_max": "c", "amount_median": 20.0, "p25": 10.0,
                   "region_nunique": 2, "units_first": 1, "units_last": 2, "rows": 5}
    assert out["metadata"]["input_rows"] == 5 and out["metadata"]["grouped"] is False
    assert out["metadata"]["aggregations"] == 11 and out["metadata"]["output_rows"] == 1


def test_aggregate_sample_std_and_variance_like_pandas():
    data = [{"x": 2}, {"x": 4}, {"x": 4}, {"x": 4}, {"x": 5}, {"x": 5}, {"x": 7}, {"x": 9}]
    row = aggregate(data, [{"func": "var", "field": "x"}, {"func": "stddev", "field": "x"}]
                    )["data"][0]
    assert math.isclose(row["x_var"], 32 / 7)
    assert math.isclose(row["x_stddev"], math.sqrt(32 / 7))
    single = aggregate([{"x": 1}], [{"func": "std", "field": "x"}])["data"][0]
    assert single == {"x_std": None}


def test_aggregate_group_by_sorted_null_keys_dropped_and_having():
    out = aggregate(SALES, [{"func": "sum", "field": "amount", "alias": "total"},
                            {"func": "count", "field": "amount", "alias": "n"}],
                    group_by=["region"])
    assert out["data"] == [{"region": "north", "total": 90, "n": 3},
                           {"region": "south", "total": 30, "n": 1}]
    assert out["metadata"]["grouped"] is True
    having = aggregate(SALES, [{"func": "sum", "field": "amount", "alias": "total"},
                               {"func": "count", "field": "amount", "alias": "n"}],
                       group_by=["region", "product"], having="total > 15 and n >= 1")
    assert having["data"] == [{"region": "north", "product": "a", "total": 70, "n": 2},
                              {"region": "north", "product": "b", "total": 20, "n": 1},
                              {"region": "south", "product": "a", "total": 30, "n": 1}]
    by_row = aggregate(SALES, [{"func": "sum", "field": "amount", "alias": "a-total"}],
                       group_by=["region"], having="row['a-total'] < 50")
    assert by_row["data"] == [{"region": "south", "a-total": 30}]


def test_aggregate_row_count_and_single_group_field():
    out = aggregate(SALES, [{"func": "count"}], group_by="product")
    assert out["data"] == [{"product": "a", "count": 3}, {"product": "b", "count": 1},
                           {"product": "c", "count": 1}]


def test_aggregate_empty_data_is_fine():
    out = aggregate([], [{"func": "sum", "field": "amount"}, {"func": "avg",
                                                              "field": "amount"}])
    assert out["success"] is True
    assert out["data"] == [{"amount_sum": 0, "amount_avg": None}]
    grouped = aggregate([], [{"func": "sum", "field": "amount"}], group_by=["region"])
    assert grouped["data"] == [] and grouped["row_count"] == 0


@pytest.mark.parametrize("aggregations,more,match", [
    ([{"func": "total", "field": "amount"}], {}, "unknown func 'total'"),
    ([{"func": "sum", "field": "price"}], {}, "field 'price' is not in the data"),
    ([{"func": "sum", "field": "product"}], {}, "'a' is not a number"),
    ([{"func": "sum"}], {}, "'field' is required"),
    ([{"func": "percentile", "field": "amount", "percentile": 120}], {}, "from 0 to 100"),
    (["sum"], {}, "aggregations\\[0\\]"),
    ([{"func": "sum", "field": "amount"}], {"group_by": ["zone"]}, "group_by field 'zone'"),
    ([{"func": "sum", "field": "amount"}], {"having": "amount_sum >"}, "having"),
])
def test_aggregate_problems_are_reported_not_raised(aggregations, more, match):
    ctx = make_context("aggregate", dict(data=SALES, aggregations=aggregations, **more))
    out = run_context(ctx)
    assert out["success"] is False and out["data"] is None
    assert re.search(match, out["error"]), out["error"]
    assert ctx._services.logs[-1][1] == "warning"


def test_aggregate_rows_must_be_objects():
    with pytest.raises(MappingError, match=r"data\[1\]"):
        aggregate([{"a": 1}, 5], [{"func": "count", "field": "a"}])


# -- join ---------------------------------------------------------------------------------

PEOPLE = [{"id": 1, "name": "Alice", "city": "Oslo"}, {"id": 2, "name": "Bob"},
          {"id": 3, "name": "Cy", "city": "Rome"}]
SCORES = [{"id": 1, "score": 95, "city": "Bergen"}, {"id": 1, "score": 90},
          {"id": 4, "score": 70}]


def join(left, right, left_on="id", right_on="id", **more):
    return call_component("join", dict(left_data=left, right_data=right, left_on=left_on,
                                       right_on=right_on, **more))


def test_join_inner_with_suffixes_and_shared_key_once():
    out = join(PEOPLE, SCORES)
    assert sorted(out) == ["columns", "data", "error", "metadata", "row_count", "success"]
    assert out["columns"] == ["id", "name", "city_left", "score", "city_right"]
    assert out["data"] == [
        {"id": 1, "name": "Alice", "city_left": "Oslo", "score": 95, "city_right": "Bergen"},
        {"id": 1, "name": "Alice", "city_left": "Oslo", "score": 90, "city_right": None}]
    assert out["row_count"] == 2
    assert out["metadata"]["left_rows"] == 3 and out["metadata"]["right_rows"] == 3
    assert out["metadata"]["left_on"] == ["id"] and out["metadata"]["join_type"] == "inner"


def test_join_left_right_outer():
    left = join(PEOPLE, SCORES, join_type="left")
    assert [(r["name"], r["score"]) for r in left["data"]] == [
        ("Alice", 95), ("Alice", 90), ("Bob", None), ("Cy", None)]
    right = join(PEOPLE, SCORES, join_type="right")
    assert [(r["id"], r["name"], r["score"]) for r in right["data"]] == [
        (1, "Alice", 95), (1, "Alice", 90), (4, None, 70)]
    outer = join(PEOPLE, SCORES, join_type="full_outer", suffixes=["", "_s"])
    assert [(r["id"], r["name"], r["score"]) for r in outer["data"]] == [
        (1, "Alice", 95), (1, "Alice", 90), (2, "Bob", None), (3, "Cy", None),
        (4, None, 70)]
    assert outer["columns"] == ["id", "name", "city", "score", "city_s"]
    assert join(PEOPLE, SCORES, join_type="OUTER")["row_count"] == 5


def test_join_different_key_names_and_composite_keys():
    users = [{"user_id": 1, "name": "Alice"}]
    orders = [{"customer_id": 1, "total": 100}, {"customer_id": 2, "total": 5}]
    out = join(users, orders, "user_id", "customer_id", join_type="left")
    assert out["data"] == [{"user_id": 1, "name": "Alice", "customer_id": 1, "total": 100}]
    sales = [{"region": "US", "product": "W", "sales": 100},
             {"region": "EU", "product": "W", "sales": 7}]
    costs = [{"region": "US", "product": "W", "cost": 50}]
    composite = join(sales, costs, ["region", "product"], ["region", "product"])
    assert composite["data"] == [{"region": "US", "product": "W", "sales": 100, "cost": 50}]


def test_join_cross_and_null_keys():
    out = join([{"a": 1}, {"a": 2}], [{"b": "x"}], "nope", "nope", join_type="cross")
    assert out["data"] == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    nulls = join([{"k": None, "l": 1}], [{"k": None, "r": 2}], "k", "k")
    assert nulls["data"] == []


@pytest.mark.parametrize("more,match", [
    ({"left_on": "missing"}, "Left join keys not found in left dataset: \\['missing'\\]"),
    ({"right_on": "missing"}, "Right join keys not found"),
    ({"join_type": "semi"}, "Invalid join type"),
    ({"left_on": ["id", "name"]}, "left_on has 2 fields"),
    ({"suffixes": ["_x"]}, "suffixes must be two strings"),
])
def test_join_problems_are_reported_not_raised(more, match):
    inputs = dict(left_data=PEOPLE, right_data=SCORES, left_on="id", right_on="id")
    inputs.update(more)
    out = call_component("join", inputs)
    assert out["success"] is False and re.search(match, out["error"]), out["error"]
    assert out["data"] is None


def test_join_empty_side_and_size_limit():
    assert join([], SCORES, join_type="right")["row_count"] == 3
    assert join(PEOPLE, [])["row_count"] == 0
    big = [{"k": 1}] * 1001
    out = join(big, big[:1000], "k", "k")
    assert out["success"] is False and str(MAX_JOIN_ROWS) in out["error"]


# -- filter_transformer -------------------------------------------------------------------

def test_filter_transformer():
    rows = [{"name": "Alice", "active": True}, {"name": "Bob", "active": False},
            {"name": "Cy", "active": True}]
    out = call_component("filter_transformer", {"data": rows, "field": "active",
                                                "value": True})
    assert out == {"data": [rows[0], rows[2]], "rows_processed": 3, "rows_filtered": 2,
                   "stats": {"field": "active", "value": True, "filter_rate": 2 / 3}}
    empty = call_component("filter_transformer", {"data": [], "field": "a", "value": 1})
    assert empty["stats"]["filter_rate"] == 0
    with pytest.raises(MappingError, match="'value' is required"):
        call_component("filter_transformer", {"data": rows, "field": "active"})
