"""The pure data operators (fmedge/pipeline/components/data.py) against semantics §4.3-4.4.

Output field names are checked exactly: downstream templates read them by name.
"""

import pytest

from fmedge.pipeline import catalog, expr, template
from fmedge.pipeline.components import get_component
from fmedge.pipeline.components.base import (BreakLoop, ComponentError, ContinueLoop,
                                             MappingError)
from fmedge.pipeline.components.data import template_names
from tests.component_harness import STAGE_ID, call_component, make_context, run_context

CONTROL_FLOW = {"conditional", "router", "foreach", "trycatch", "return", "subpipeline"}


def keys(output):
    return sorted(output)


# -- coverage -------------------------------------------------------------------------------

def test_every_available_non_llm_operator_is_implemented():
    wanted = [name for name in catalog.known_types()
              if not catalog.needs_llm(name) and name not in CONTROL_FLOW
              and not catalog.is_unavailable(name)]
    missing = [name for name in wanted if get_component(name) is None]
    assert missing == []
    assert len(wanted) == 20


def test_blocking_flags():
    for name in ("http_request", "output_router", "error_router", "local_file"):
        assert get_component(name).blocking, name
    for name in ("json_transform", "filter", "schema_validate", "aggregate", "join"):
        assert not get_component(name).blocking, name


# -- json_transform -------------------------------------------------------------------------

def test_json_transform_mapping_with_defaults_semantics_example():
    data = {"user": {"name": "Ada", "tags": ["admin", "ops"]}, "account": {}}
    out = call_component("json_transform", {
        "data": data,
        "mapping": {"name": "user.name", "first_tag": "user.tags[0]", "plan": "account.plan"},
        "defaults": {"plan": "free"}})
    assert out == {"result": {"name": "Ada", "first_tag": "admin", "plan": "free"},
                   "fields_mapped": 3, "fields_missing": ["plan"]}


def test_json_transform_mapping_missing_without_default_is_null():
    out = call_component("json_transform", {"data": {"a": 1},
                                            "mapping": {"x": "a", "y": "b.c", "z": "a.0"}})
    assert out["result"] == {"x": 1, "y": None, "z": None}
    assert out["fields_missing"] == []


def test_json_transform_mapping_numeric_segments_and_exclude():
    out = call_component("json_transform", {
        "data": {"items": [{"id": 7}, {"id": 8}]},
        "mapping": {"first": "items.0.id", "last": "items[-1].id", "drop": "items"},
        "exclude_fields": ["drop"]})
    assert out["result"] == {"first": 7, "last": 8}
    assert out["fields_mapped"] == 3


def test_json_transform_mapping_value_must_be_a_path():
    with pytest.raises(MappingError, match=r"mapping\['x'\]"):
        call_component("json_transform", {"data": {}, "mapping": {"x": 3}})


def test_json_transform_parses_llm_json_replies():
    fenced = "Here you go:\n```json\n{\"a\": 1, \"b\": [1, 2]}\n```\nthanks"
    assert call_component("json_transform", {"data": fenced})["result"] == {"a": 1, "b": [1, 2]}
    embedded = 'The answer is {"k": "v with } brace", "n": {"m": 2}} as requested'
    assert call_component("json_transform", {"data": embedded})["result"] == {
        "k": "v with } brace", "n": {"m": 2}}
    assert call_component("json_transform", {"data": "no json here"})["result"] == \
        "no json here"
    raw = call_component("json_transform", {"data": '{"a": 1}', "parse_json_strings": False})
    assert raw["result"] == '{"a": 1}'


def test_json_transform_flatten():
    out = call_component("json_transform", {"data": {"a": {"b": 1}, "t": [5, {"x": 2}],
                                                     "e": {}}, "flatten": True})
    assert out == {"result": {"a.b": 1, "t[0]": 5, "t[1].x": 2}, "fields_mapped": 3,
                   "fields_missing": []}
    scalar = call_component("json_transform", {"data": 4, "flatten": True})
    assert scalar["result"] == {"value": 4}


def test_json_transform_pass_through():
    out = call_component("json_transform", {"data": [1, 2]})
    assert out == {"result": [1, 2], "fields_mapped": 0, "fields_missing": []}


def test_json_transform_jmespath_subset():
    data = {"orders": [{"id": 1, "items": [{"sku": "a"}]}, {"id": 2, "items": []},
                       {"id": 3, "items": [{"sku": "c"}]}], "a-b": {"c": 5}}
    search = lambda expression: call_component(  # noqa: E731
        "json_transform", {"data": data, "jmespath_expression": expression})
    assert search("orders[*].items[0].sku")["result"] == ["a", "c"]
    assert search("orders[-1].id")["result"] == 3
    assert search('"a-b".c')["result"] == 5
    assert search("orders[5].id")["result"] is None
    out = search("orders[0].id")
    assert out["fields_mapped"] == 1 and out["fields_missing"] == []
    top = call_component("json_transform", {"data": [[1, 2], [3]],
                                            "jmespath_expression": "[*][0]"})
    assert top["result"] == [1, 3]


@pytest.mark.parametrize("expression", ["orders[?id > `1`]", "a | b", "{x: a}",
                                        "length(a)", "a.", ".a", "a..b", '"bad\\q"'])
def test_json_transform_refuses_jmespath_it_cannot_do(expression):
    with pytest.raises(ComponentError, match="jmespath_expression"):
        call_component("json_transform", {"data": {}, "jmespath_expression": expression})


def test_json_transform_requires_data_without_template():
    with pytest.raises(MappingError, match="'data' is required"):
        call_component("json_transform", {"mapping": {"a": "b"}})


def test_json_transform_template_fields_are_the_output():
    # agentic-support-workflow `ingest-inquiry`, after the executor resolved the template.
    template = {"inquiry_id": "INQ-1", "customer_message": "My order is late",
                "channel": "web", "metadata": {"account_tier": "standard"}}
    out = call_component("json_transform", {"template": template})
    assert out == template
    # Later stages read {{upstream.ingest-inquiry.customer_message}}.
    assert out["customer_message"] == "My order is late"


def test_json_transform_template_with_data_and_exclude():
    out = call_component("json_transform", {"data": {"x": 1},
                                            "template": {"a": 1, "b": 2},
                                            "exclude_fields": ["b"]})
    assert out == {"a": 1}
    assert call_component("json_transform", {"template": [1, 2]}) == {"result": [1, 2]}


def test_gallery_data_templates_resolve_with_template_names():
    """How the executor resolves a `template` that reads the stage's own `data`
    (devops-health-monitor determine-severity, multi-service transform-secondary)."""
    inputs = {"data": '```json\n{"unhealthy_count": 2, "items": null}\n```',
              "template": {
                  "severity": "{{ 'critical' if data.unhealthy_count >= 3 else ('high' if "
                              "data.unhealthy_count >= 2 else 'medium') }}",
                  "unhealthy_count": "{{data.unhealthy_count}}",
                  "items": "{{data.items or []}}",
                  "total_count": "{{len(data.items) if data.items else 0}}",
                  "source": "{{upstream.aggregate-results.checked_at}}"}}
    scope = template.TemplateScope(
        upstream={"aggregate-results": {"checked_at": "2025-01-01T00:00:00Z"}},
        extra=template_names(inputs))
    resolved = dict(inputs, template=template.resolve(inputs["template"], scope))
    out = call_component("json_transform", resolved)
    assert out == {"severity": "high", "unhealthy_count": 2, "items": [], "total_count": 0,
                   "source": "2025-01-01T00:00:00Z"}


def test_gallery_data_templates_evaluate_as_the_executor_will():
    """The gallery's json-transform templates that read `data` (enterprise-data-pipeline,
    devops-*): evaluated with `data` bound, as the executor must, they give plain values."""
    activities = {"activities": [{"date": "2024-05-01", "type": "call"},
                                 {"date": "2024-04-01", "type": "email"},
                                 {"date": "2024-03-01", "type": "call"}]}
    template = {
        "total_activities": "len(data.activities) if data.activities else 0",
        "last_contact_date": "data.activities[0].date if data.activities else 'Never'",
        "activity_types": "set([a.type for a in data.activities]) if data.activities else []",
        "recent_activities": "data.activities[:5] if data.activities else []",
    }
    resolved = {key: expr.evaluate(source, {"data": activities})
                for key, source in template.items()}
    out = call_component("json_transform", {"data": activities, "template": resolved})
    assert out["total_activities"] == 3
    assert out["last_contact_date"] == "2024-05-01"
    assert out["activity_types"] == ["call", "email"]
    health = [{"healthy": True, "response_time_ms": 10}, {"healthy": False,
                                                          "response_time_ms": 30}]
    unhealthy = expr.evaluate("len([r for r in data if not r.get('healthy', True)])",
                              {"data": health})
    average = expr.evaluate("sum([r.get('response_time_ms', 0) for r in data]) / len(data) "
                            "if data else 0", {"data": health})
    assert (unhealthy, average) == (1, 20.0)


# -- filter ---------------------------------------------------------------------------------

def test_filter_pass_fail_condition():
    out = call_component("filter", {"data": {"score": 0.9}, "condition": "data['score'] > 0.8"})
    assert out == {"passed": True, "data": {"score": 0.9}, "filtered_count": 0,
                   "reason": "Expression \"data['score'] > 0.8\" = True"}
    failed = call_component("filter", {"data": {"score": 0.1},
                                       "condition": "data['score'] > 0.8"})
    assert failed["passed"] is False and failed["data"] is None


def test_filter_invert_and_field_conditions():
    out = call_component("filter", {"data": {"status": "active", "n": 1},
                                    "field_conditions": {"status": "active"}, "invert": True})
    assert out["passed"] is False and out["reason"].startswith("(inverted) ")
    missing = call_component("filter", {"data": {"n": 1},
                                        "field_conditions": {"status": "active"}})
    assert missing["passed"] is False and missing["reason"] == "Missing field: status"
    tolerated = call_component("filter", {"data": {"n": 1}, "pass_if_missing": True,
                                          "field_conditions": {"status": "active"}})
    assert tolerated["passed"] is True
    assert call_component("filter", {"data": 5})["passed"] is True   # no conditions


def test_filter_expression_errors_fail_closed_or_pass_if_missing():
    ctx = make_context("filter", {"data": {"a": 1}, "condition": "data['missing'] > 1"})
    out = run_context(ctx)
    assert out["passed"] is False and out["reason"].startswith("Expression error")
    assert ctx._services.logs[0][1] == "warning"
    lenient = call_component("filter", {"data": {"a": 1}, "pass_if_missing": True,
                                        "condition": "data['missing'] > 1"})
    assert lenient["passed"] is True


def test_filter_array_mode():
    items = [{"status": "active", "n": 1}, {"status": "off", "n": 2}, {"status": "active"}]
    out = call_component("filter", {"data": items, "filter_mode": "filter_array",
                                    "condition": "item.get('status') == 'active'"})
    assert out == {"passed": True, "data": [items[0], items[2]], "filtered_count": 1,
                   "reason": "Filtered 1 items, 2 passed"}
    none = call_component("filter", {"data": items, "filter_mode": "filter_array",
                                     "field_conditions": {"n": 5}})
    assert none["passed"] is False and none["data"] == [] and none["filtered_count"] == 3
    hinted = call_component("filter", {"data": [1], "filter_mode": "filter_array",
                                       "condition": "data > 0"})
    assert hinted["data"] == []


def test_filter_unknown_mode_is_refused():
    with pytest.raises(MappingError, match="filter_mode 'array'"):
        call_component("filter", {"data": [], "filter_mode": "array"})


@pytest.mark.parametrize("data,condition,pass_if_missing,expected", [
    # agentic-support-workflow filter-escalation
    ({"classification": "critical outage", "sentiment": "neutral"},
     "'very_negative' in str(data) or 'critical' in str(data) or 'high' in "
     "str(data.get('sentiment', '')) or 'requires_human' in str(data) and 'yes' in str(data)",
     False, True),
    # devops-cicd-deployment check-build-success / evaluate-tests
    ({"status": "success", "tests_passed": True},
     "data.get('status') == 'success' and data.get('tests_passed', False) == True", False, True),
    ({"passed": True, "failures": 2},
     "data.get('passed', False) == True and data.get('failures', 1) == 0", False, False),
    # devops-health-monitor check-alert-needed
    ({"unhealthy_count": 2}, "data.get('unhealthy_count', 0) > 0", False, True),
    # enterprise-data-pipeline filter-high-value
    ({"revenue": 50000, "health_score": 80},
     "data.get('revenue', 0) > 100000 or data.get('health_score', 0) > 70", True, True),
    # devops-multi-service-orchestration check-enrichment-needed (whole input)
    ({"entity_id": "e1"}, "data.get('include_enrichment', False) == True", False, False),
])
def test_filter_gallery_conditions(data, condition, pass_if_missing, expected):
    out = call_component("filter", {"data": data, "condition": condition,
                                    "pass_if_missing": pass_if_missing})
    assert out["passed"] is expected


# -- logger ---------------------------------------------------------------------------------

def test_logger_output_and_log_entry():
    ctx = make_context("logger", {"message": "Starting deployment", "level": "INFO",
                                  "data": {"service": "api"}, "tags": {"env": "prod"},
                                  "passthrough": {"keep": 1}})
    out = run_context(ctx)
    assert keys(out) == ["log_id", "logged", "passthrough"]
    assert out["logged"] is True and out["passthrough"] == {"keep": 1}
    assert len(out["log_id"]) == 8 and int(out["log_id"], 16) >= 0
    assert ctx._services.logs == [(STAGE_ID, "info", "Starting deployment",
                                   {"log_id": out["log_id"], "data": {"service": "api"},
                                    "tags": {"env": "prod"}})]


def test_logger_log_id_is_deterministic_per_entry():
    first = call_component("logger", {"message": "m", "data": {"a": 1}})["log_id"]
    assert call_component("logger", {"message": "m", "data": {"a": 1}})["log_id"] == first
    assert call_component("logger", {"message": "m", "data": {"a": 2}})["log_id"] != first


def test_logger_levels():
    ctx = make_context("logger", {"message": "x", "level": "warn", "emit_to_trace": True})
    run_context(ctx)
    assert ctx._services.logs[0][1] == "warning"
    quiet = make_context("logger", {"message": "x", "emit_to_trace": False})
    run_context(quiet)
    assert quiet._services.logs == []
    with pytest.raises(MappingError, match="level 'loud'"):
        call_component("logger", {"message": "x", "level": "loud"})
    with pytest.raises(MappingError, match="'message' is required"):
        call_component("logger", {"level": "info"})


# -- schema_validate ------------------------------------------------------------------------

CICD_SCHEMA = {  # devops-cicd-deployment validate-input
    "type": "object", "required": ["service_name", "version", "artifact_url"],
    "properties": {
        "service_name": {"type": "string", "minLength": 1},
        "version": {"type": "string", "pattern": "^v?[0-9]+\\.[0-9]+\\.[0-9]+.*$"},
        "artifact_url": {"type": "string", "format": "uri"},
        "target_environment": {"type": "string", "enum": ["staging", "production"]}}}


def test_schema_validate_gallery_schema_alias_valid():
    data = {"service_name": "api", "version": "v1.2.3", "artifact_url": "https://x/a.tgz",
            "target_environment": "staging"}
    out = call_component("schema_validate", {"data": data, "schema": CICD_SCHEMA})
    assert out == {"valid": True, "data": data, "errors": [], "error_count": 0}


def test_schema_validate_reports_every_error_with_paths():
    data = {"service_name": "", "version": "latest", "target_environment": "dev"}
    out = call_component("schema_validate", {"data": data, "json_schema": CICD_SCHEMA})
    assert out["valid"] is False and out["data"] == data
    by_validator = {error["validator"]: error for error in out["errors"]}
    assert sorted(by_validator) == ["enum", "minLength", "pattern", "required"]
    assert by_validator["required"] == {
        "path": [], "message": "'artifact_url' is a required property",
        "validator": "required", "validator_value": CICD_SCHEMA["required"]}
    assert by_validator["minLength"]["path"] == ["service_name"]
    assert by_validator["enum"]["message"] == "'dev' is not one of ['staging', 'production']"
    assert out["error_count"] == 4
    first = call_component("schema_validate", {"data": data, "json_schema": CICD_SCHEMA,
                                               "collect_all_errors": False})
    assert first["error_count"] == 1


@pytest.mark.parametrize("schema,good,bad", [
    ({"type": "integer"}, 3, 3.5),
    ({"type": "integer"}, 2.0, True),
    ({"type": "number", "minimum": 1, "maximum": 3}, 3, 3.01),
    ({"exclusiveMinimum": 1, "exclusiveMaximum": 3}, 2, 1),
    ({"type": ["string", "null"]}, None, 1),
    ({"const": {"a": [1]}}, {"a": [1]}, {"a": [True]}),
    ({"maxLength": 2}, "ab", "abc"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
     ["a"], ["a", 1]),
    ({"type": "array", "minItems": 1}, [0], []),
    ({"properties": {"a": {"type": "object", "required": ["b"]}}}, {"a": {"b": 1}},
     {"a": {}}),
    ({"additionalProperties": False, "properties": {"a": {}}}, {"a": 1}, {"a": 1, "b": 2}),
    ({"additionalProperties": {"type": "number"}, "patternProperties": {"^s_": {"type":
                                                                              "string"}}},
     {"s_x": "t", "n": 1}, {"s_x": "t", "n": "1"}),
    ({"uniqueItems": True}, [1, 2], [1, 1]),
    ({"multipleOf": 0.5}, 1.5, 1.2),
    ({"anyOf": [{"type": "string"}, {"minimum": 5}]}, 7, 3),
    ({"oneOf": [{"type": "integer"}, {"minimum": 5}]}, 3, 7),
    ({"not": {"type": "null"}}, 0, None),
    ({"items": [{"type": "string"}], "additionalItems": False}, ["a"], ["a", "b"]),
    ({"contains": {"const": 2}}, [1, 2], [1]),
    ({"dependencies": {"card": ["billing"]}}, {"card": 1, "billing": 2}, {"card": 1}),
    ({"if": {"properties": {"kind": {"const": "a"}}}, "then": {"required": ["x"]}},
     {"kind": "b"}, {"kind": "a"}),
    ({"definitions": {"pos": {"minimum": 0}}, "properties": {"n": {"$ref":
                                                                    "#/definitions/pos"}}},
     {"n": 1}, {"n": -1}),
    (False, None, 1),
])
def test_schema_validate_draft7_keywords(schema, good, bad):
    if schema is not False:
        assert call_component("schema_validate", {"data": good, "json_schema": schema}
                              )["valid"] is True
    assert call_component("schema_validate", {"data": bad, "json_schema": schema if schema
                                              is not False else {"not": {}}})["valid"] is False


def test_schema_validate_messages_name_the_value():
    out = call_component("schema_validate", {"data": {"n": "7", "x": 1},
                                             "json_schema": {"properties": {
                                                 "n": {"type": "integer"}},
                                                 "additionalProperties": False}})
    messages = sorted(error["message"] for error in out["errors"])
    assert messages == ["'7' is not of type 'integer'",
                        "Additional properties are not allowed ('x' was unexpected)"]


def test_schema_validate_coerce_types():
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                               "ok": {"type": "boolean"},
                                               "tags": {"type": "array",
                                                        "items": {"type": "number"}},
                                               "bad": {"type": "integer"}}}
    out = call_component("schema_validate", {"data": {"n": "3", "ok": "true",
                                                      "tags": ["1.5", "2"], "bad": "3.5"},
                                             "json_schema": schema, "coerce_types": True})
    assert out["data"] == {"n": 3, "ok": True, "tags": [1.5, 2], "bad": "3.5"}
    assert [error["path"] for error in out["errors"]] == [["bad"]]


def test_schema_validate_null_data_and_bad_schemas():
    out = call_component("schema_validate", {"data": None, "json_schema": {"type": "object"}})
    assert out["valid"] is False and out["errors"][0]["message"] == \
        "None is not of type 'object'"
    with pytest.raises(MappingError, match="'json_schema' is required"):
        call_component("schema_validate", {"data": {}})
    with pytest.raises(MappingError, match="'str' at /a"):
        call_component("schema_validate", {"data": {"a": 1}, "json_schema": {
            "properties": {"a": {"type": "str"}}}})
    with pytest.raises(ComponentError, match="only local references"):
        call_component("schema_validate", {"data": 1, "json_schema": {
            "$ref": "https://example.com/schema.json"}})
    with pytest.raises(MappingError, match="not a valid regular expression"):
        call_component("schema_validate", {"data": "x", "json_schema": {"pattern": "("}})


def test_schema_validate_multi_service_gallery_output_check():
    # devops-multi-service-orchestration validate-output on the merge-all-data output.
    schema = {"type": "object", "required": ["entity", "merged_at"],
              "properties": {"entity": {"type": "object", "required": ["id", "name"]},
                             "history": {"type": "object"}, "metadata": {"type": "object"},
                             "merged_at": {"type": "string"}}}
    merged = {"entity": {"id": "e1", "name": "Acme"}, "history": {}, "metadata": {},
              "merged_at": "2025-01-01T00:00:00Z"}
    assert call_component("schema_validate", {"data": merged, "schema": schema})["valid"]
    merged["entity"] = {"id": "e1"}
    out = call_component("schema_validate", {"data": merged, "schema": schema})
    assert out["errors"][0]["path"] == ["entity"]


# -- variable_set ---------------------------------------------------------------------------

def test_variable_set_writes_run_variables():
    variables = {}
    out = call_component("variable_set", {"name": "customer", "value": {"id": 7}},
                         variables=variables)
    assert out == {"name": "customer", "value": {"id": 7}, "previous_value": None,
                   "was_set": True, "variables": {"customer": {"id": 7}}}
    assert variables == {"customer": {"id": 7}}


def test_variable_set_extract_path_and_overwrite():
    variables = {"n": 1}
    out = call_component("variable_set", {"name": "n", "value": {"items": [{"id": 5}]},
                                          "extract_path": "items[0].id"}, variables=variables)
    assert out["value"] == 5 and out["previous_value"] == 1 and variables["n"] == 5
    kept = call_component("variable_set", {"name": "n", "value": 9, "overwrite": False},
                          variables=variables)
    assert kept == {"name": "n", "value": 5, "previous_value": 5, "was_set": False,
                    "variables": {"n": 5}}
    assert variables["n"] == 5


def test_variable_set_gallery_variables_map():
    # document-batch-processor set-processing-vars, read as .variables.total_docs.
    variables = {}
    out = call_component("variable_set", {"variables": {"total_docs": 7, "batch_count": 3}},
                         variables=variables)
    assert out["variables"] == {"total_docs": 7, "batch_count": 3}
    assert out["value"] == {"total_docs": 7, "batch_count": 3}
    assert out["was_set"] is True and out["name"] is None
    assert variables == {"total_docs": 7, "batch_count": 3}


@pytest.mark.parametrize("inputs,match", [
    ({"name": "2bad", "value": 1}, "not valid"),
    ({"name": "a-b", "value": 1}, "not valid"),
    ({"name": "x"}, "'name' and 'value' are required"),
    ({"variables": {"ok": 1, "no way": 2}}, "'no way'"),
    ({"name": "x", "value": 1, "variables": {"y": 2}}, "not both"),
])
def test_variable_set_refusals(inputs, match):
    with pytest.raises(MappingError, match=match):
        call_component("variable_set", inputs)


# -- loop -----------------------------------------------------------------------------------

def test_loop_batches_gallery_document_batch_processor():
    documents = ["d{}".format(i) for i in range(8)]
    out = call_component("loop", {"items": documents, "batch_size": 3, "max_iterations": 10,
                                  "include_metadata": True})
    assert out == {"batches": [documents[0:3], documents[3:6], documents[6:8]],
                   "total_items": 8, "total_batches": 3, "has_more": False,
                   "metadata": {"start_index": 0, "batch_size": 3, "items_processed": 8,
                                "items_remaining": 0}}


def test_loop_limits_and_start_index():
    out = call_component("loop", {"items": list(range(10)), "batch_size": 2,
                                  "max_iterations": 2, "start_index": 1,
                                  "include_metadata": False})
    assert out == {"batches": [[1, 2], [3, 4]], "total_items": 10, "total_batches": 2,
                   "has_more": True, "metadata": {}}
    empty = call_component("loop", {"items": []})
    assert empty["batches"] == [] and empty["has_more"] is False
    with pytest.raises(MappingError, match="batch_size is 0"):
        call_component("loop", {"items": [1], "batch_size": 0})
    with pytest.raises(MappingError, match="batch_size is 1001"):
        call_component("loop", {"items": [1], "batch_size": 1001})


# -- switch_router --------------------------------------------------------------------------

def test_switch_router_modes():
    cases = [{"condition": "admin", "route": "admin_path"},
             {"condition": "user", "route": "user_path"}]
    out = call_component("switch_router", {"data": {"user": {"role": "user"}},
                                           "value_path": "user.role", "cases": cases,
                                           "default_route": "other"})
    assert out == {"matched_route": "user_path", "matched_case": cases[1], "value": "user",
                   "data": {"user": {"role": "user"}}}
    default = call_component("switch_router", {"data": "guest", "cases": cases,
                                               "default_route": "other"})
    assert default["matched_route"] == "other" and default["matched_case"] is None
    numeric = [{"condition": 100, "route": "big"}]
    assert call_component("switch_router", {"data": {"total": "250"}, "value_path": "total",
                                            "cases": numeric,
                                            "comparison_mode": "greater_than"}
                          )["matched_route"] == "big"
    assert call_component("switch_router", {"data": "order-123", "comparison_mode": "regex",
                                            "cases": [{"condition": r"^order-\d+$",
                                                       "route": "orders"}]}
                          )["matched_route"] == "orders"
    assert call_component("switch_router", {"data": ["a", "b"], "comparison_mode": "contains",
                                            "cases": [{"condition": "b", "route": "has_b"}]}
                          )["matched_route"] == "has_b"


def test_switch_router_refuses_bad_settings():
    with pytest.raises(MappingError, match="comparison_mode 'equal'"):
        call_component("switch_router", {"data": 1, "cases": [],
                                         "comparison_mode": "equal"})
    with pytest.raises(MappingError, match=r"cases\[0\]"):
        call_component("switch_router", {"data": 1, "cases": ["admin"]})


# -- rule_checker ---------------------------------------------------------------------------

RULES = [
    {"id": "ssn-detection", "name": "SSN Detection", "type": "regex", "field": "message",
     "pattern": r"\d{3}-\d{2}-\d{4}", "severity": "critical", "action": "block",
     "message": "Social Security Number detected"},
    {"id": "amount-limit", "name": "Transaction Limit", "type": "threshold",
     "field": "amount", "operator": ">", "value": 10000, "severity": "high",
     "action": "require_approval", "message": "Transaction exceeds $10,000 limit"},
]


def test_rule_checker_reference_example():
    out = call_component("rule_checker", {"data": {"message": "My SSN is 123-45-6789",
                                                   "amount": 15000}, "rules": RULES})
    assert keys(out) == ["blocking_violations", "passed", "passed_rules", "requires_approval",
                         "rules_checked", "violations", "warning_count"]
    assert out["passed"] is False and out["blocking_violations"] == 1
    assert out["requires_approval"] is True and out["warning_count"] == 1
    assert out["rules_checked"] == 2
    assert out["violations"][0] == {
        "rule_id": "ssn-detection", "rule_name": "SSN Detection", "severity": "critical",
        "action": "block", "message": "Social Security Number detected", "field": "message",
        "matched_value": "123-45-6789"}
    assert out["violations"][1]["matched_value"] == 15000.0


def test_rule_checker_passes_and_include_passed_and_fail_fast():
    clean = call_component("rule_checker", {"data": {"message": "hello", "amount": 5},
                                            "rules": RULES, "include_passed": True})
    assert clean["passed"] is True and clean["violations"] == []
    assert [r["rule_id"] for r in clean["passed_rules"]] == ["ssn-detection", "amount-limit"]
    fast = call_component("rule_checker", {"data": {"message": "123-45-6789",
                                                    "amount": 99999},
                                           "rules": RULES, "fail_fast": True})
    assert [v["rule_id"] for v in fast["violations"]] == ["ssn-detection"]


def test_rule_checker_builtin_contains_expression_and_nested_fields():
    rules = [
        {"id": "email", "type": "builtin", "pattern_name": "email"},
        {"id": "words", "keywords": ["Refund"], "field": "notes.0"},
        {"id": "tier", "type": "expression", "expression": "customer.tier == gold",
         "action": "block"},
        {"id": "age", "type": "expression", "expression": "customer.age >= 18"},
    ]
    data = {"contact": "write to ada@example.com", "notes": ["please refund me"],
            "customer": {"tier": "gold", "age": 30}}
    out = call_component("rule_checker", {"data": data, "rules": rules})
    assert [v["rule_id"] for v in out["violations"]] == ["email", "words", "tier", "age"]
    assert out["violations"][0]["matched_value"] == "ada@example.com"
    assert out["blocking_violations"] == 1 and out["warning_count"] == 3


def test_rule_checker_named_field_is_the_only_place_searched():
    rule = {"id": "ssn", "type": "builtin", "pattern_name": "ssn", "field": "notes"}
    out = call_component("rule_checker", {"data": {"other": "123-45-6789"}, "rules": [rule]})
    assert out["violations"] == []


@pytest.mark.parametrize("rule,match", [
    ({"type": "regexp", "pattern": "x"}, "type 'regexp'"),
    ({"type": "regex", "pattern": "("}, "not a valid regular expression"),
    ({"type": "builtin", "pattern_name": "passport"}, "pattern_name 'passport'"),
    ({"type": "threshold", "field": "n", "operator": "=>", "value": 1}, "operator '=>'"),
])
def test_rule_checker_refuses_broken_rules(rule, match):
    with pytest.raises(MappingError, match=match):
        call_component("rule_checker", {"data": {"n": 5, "s": "x"}, "rules": [rule]})


# -- break_loop / continue_loop / retry / timeout / echo ------------------------------------

def test_break_and_continue_loop():
    assert call_component("break_loop", {"condition": False}) == {
        "broken": False, "result": None, "message": None}
    with pytest.raises(BreakLoop) as caught:
        call_component("break_loop", {"condition": True, "result": {"found": 3},
                                      "message": "found it"})
    assert caught.value.result == {"found": 3} and caught.value.message == "found it"
    assert call_component("continue_loop", {"condition": False}) == {
        "continued": False, "message": None}
    with pytest.raises(ContinueLoop) as skipped:
        call_component("continue_loop", {"condition": True, "message": "skip"})
    assert skipped.value.message == "skip"
    with pytest.raises(MappingError, match="'condition' is required"):
        call_component("break_loop", {})


def test_retry_and_timeout_pass_through():
    assert call_component("retry", {"task": {"x": 1}}) == {
        "success": True, "result": {"x": 1}, "attempts": 1, "errors": [], "exhausted": False}
    assert call_component("timeout", {"task": [1], "timeout": 5}) == {
        "success": True, "timed_out": False, "elapsed": 0.0, "timeout_value": 5,
        "result": [1], "warning": False, "percent_elapsed": 0.0}
    with pytest.raises(MappingError, match="max_retries is 11"):
        call_component("retry", {"task": 1, "max_retries": 11})
    with pytest.raises(MappingError, match="above 0"):
        call_component("timeout", {"task": 1, "timeout": 0})


def test_echo_connector():
    out = call_component("echo_connector", {"operation": "ping", "data": {"a": 1},
                                            "metadata": {"k": "v"}})
    assert out == {"success": True, "operation": "ping", "echoed_data": {"a": 1},
                   "metadata": {"k": "v", "connection_id": "conn_12345",
                                "connector_type": "echo",
                                "timestamp": "0123456789abcdef0123456789abcdef"},
                   "error": None}
