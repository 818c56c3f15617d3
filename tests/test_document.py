"""Pipeline documents: dialects, reconciliation, validation, inheritance, waves, hashing."""

import hashlib
import json

import pytest

from fmedge.errors import PipelineValidationError
from fmedge.pipeline import catalog
from fmedge.pipeline.document import (
    RetryPolicy,
    parse_pipeline,
    pipeline_sha256,
    topological_waves,
    validate_document,
)
from tests.gallery import NEEDS_EXTERNAL_SERVICE, TEMPLATE_NAMES, require_gallery


def doc_with(*stages, **top):
    doc = {"id": "demo", "name": "Demo", "stages": list(stages)}
    doc.update(top)
    return doc


def gen(stage_id, **fields):
    stage = {"id": stage_id, "type": "generator", "input_mapping": {"prompt": "hi"}}
    stage.update(fields)
    return stage


def refusal(doc, **kwargs):
    with pytest.raises(PipelineValidationError) as info:
        parse_pipeline(doc, **kwargs)
    return info.value


def assert_names(error, stage, field, *more):
    """The message names the pipeline, the stage, the field, and any extra fragments."""
    message = str(error)
    assert "pipeline 'demo'" in message
    assert "stage {}".format(stage) in message
    assert "field '{}'".format(field) in message
    assert "Fix:" in message
    for fragment in more:
        assert fragment in message, (fragment, message)


# -- Dialects -----------------------------------------------------------------------------

CANONICAL = {
    "name": "summarise-and-review",
    "version": "1.0.0",
    "input_schema": {"type": "object", "properties": {"text": {"type": "string"}},
                     "required": ["text"]},
    "stages": [
        {"id": "draft", "type": "generator",
         "input_mapping": {"prompt": "Summarise:\n{{input.text}}", "temperature": 0.2}},
        {"id": "review", "type": "critic", "depends_on": ["draft"],
         "input_mapping": {"content": "{{upstream.draft.content}}",
                           "criteria": ["accuracy", "brevity"]}},
    ],
    "output_stage_id": "review",
}


def test_canonical_dialect():
    pipeline = parse_pipeline(CANONICAL)
    assert pipeline.id == "summarise-and-review"       # no id: the name is the id (CLI)
    assert pipeline.version == "1.0.0"
    assert pipeline.stage_ids == ("draft", "review")
    review = pipeline.stage("review")
    assert review.type == "critic"
    assert review.depends_on == ("draft",)
    assert review.inputs["content"] == "{{upstream.draft.content}}"   # not resolved yet
    assert pipeline.output_stage_id == "review"
    assert pipeline.input_schema["required"] == ["text"]


def test_studio_dialect():
    doc = {
        "id": "s1", "name": "summarise-and-review", "category": "content",
        "tags": ["a"], "example_input": {"text": "x"},
        "stages": [
            {"id": "draft", "component_type": "generator", "config": {"prompt": "{{input.text}}"},
             "depends_on": [], "position": {"x": 100, "y": 100},
             "llm_settings": {"temperature": 0.9, "model": "llama3"}},
            {"id": "review", "component_type": "critic", "depends_on": ["draft"],
             "config": {"content": "{{upstream.draft.content}}"}},
        ],
        "output_stage_id": "review",
    }
    pipeline = parse_pipeline(doc)
    assert pipeline.id == "s1" and pipeline.name == "summarise-and-review"
    assert pipeline.version == "1.0.0"
    assert pipeline.sample_input == {"text": "x"}
    assert pipeline.tags == ("a",) and pipeline.category == "content"
    draft = pipeline.stage("draft")
    assert draft.type == "generator" and draft.inputs == {"prompt": "{{input.text}}"}
    assert draft.temperature == 0.9 and draft.model == "llama3"
    assert draft.raw["position"] == {"x": 100, "y": 100}


def test_project_file_dialect():
    doc = {"$schema": "x", "name": "etl", "sample_input": {"n": 1},
           "stages": [{"id": "log", "component": "logger", "config": {"message": "hi"}}]}
    pipeline = parse_pipeline(doc)
    assert pipeline.stage("log").type == "logger"
    assert pipeline.sample_input == {"n": 1}


def test_type_is_first_non_empty_of_type_component_type_component():
    stages = [
        {"id": "a", "type": "critic", "component_type": "generator", "component": "logger"},
        {"id": "b", "type": "", "component_type": "critic"},
        {"id": "c", "type": None, "component_type": None, "component": "logger"},
    ]
    pipeline = parse_pipeline(doc_with(*stages))
    assert [s.type for s in pipeline.stages] == ["critic", "critic", "logger"]


def test_pipeline_id_argument_wins_over_document_id():
    assert parse_pipeline(doc_with(gen("a")), pipeline_id="cache-key").id == "cache-key"


# -- Reconciliation (semantics §1.4) -------------------------------------------------------

def test_config_wins_over_input_mapping_on_the_same_key():
    stage = gen("a", input_mapping={"prompt": "B", "system_prompt": "S"},
                config={"prompt": "A", "max_tokens": 5})
    inputs = parse_pipeline(doc_with(stage)).stage("a").inputs
    assert inputs == {"prompt": "A", "system_prompt": "S", "max_tokens": 5}


def test_null_config_and_missing_mapping_are_empty():
    stage = {"id": "a", "type": "logger", "config": None}
    assert parse_pipeline(doc_with(stage)).stage("a").inputs == {}


def test_stage_inputs_do_not_share_objects_with_the_document():
    doc = doc_with(gen("a", config={"criteria": ["x"]}))
    pipeline = parse_pipeline(doc)
    doc["stages"][0]["config"]["criteria"].append("y")
    assert pipeline.stage("a").inputs["criteria"] == ["x"]


# -- Catalogue and aliases ------------------------------------------------------------------

def test_aliases_resolve_to_canonical_names():
    stages = [
        {"id": "t", "component_type": "json-transform", "config": {"data": {}}},
        {"id": "s", "component_type": "synthesizer", "config": {"inputs": ["a", "b"]}},
        {"id": "h", "type": "HTTP-Request", "input_mapping": {"url": "http://x"}},
    ]
    pipeline = parse_pipeline(doc_with(*stages))
    assert [s.type for s in pipeline.stages] == ["json_transform", "combiner", "http_request"]
    assert pipeline.stage("s").declared_type == "synthesizer"


def test_catalogue_functions():
    assert catalog.canonical_type("schema-validate") == "schema_validate"
    assert catalog.canonical_type("variable-set") == "variable_set"
    assert catalog.canonical_type("synthesizer") == "combiner"
    assert catalog.canonical_type("nope") is None
    assert catalog.canonical_type(None) is None
    known = catalog.known_types()
    assert known == sorted(known) and len(known) == 54
    assert "synthesizer" not in known and "return" in known
    assert catalog.aliases()["json-transform"] == "json_transform"
    assert catalog.is_unavailable("postgres") and catalog.is_unavailable("mcp-tool-call")
    assert not catalog.is_unavailable("http_request") and not catalog.is_unavailable("nope")
    assert catalog.needs_llm("synthesizer") and not catalog.needs_llm("json_transform")
    assert catalog.category("foreach") == catalog.CONTROL
    assert catalog.category("switch_router") == catalog.OPERATOR
    assert catalog.default_timeout_ms("generator") == 120000
    assert set(catalog.available_types()) < set(known)
    unavailable = {"sql", "pandas", "postgres", "mongodb", "redis", "s3",
                   "mcp_tool_call", "mcp_list_tools"}
    assert unavailable <= set(known) - set(catalog.available_types())


# -- Stage execution settings ------------------------------------------------------------------

def test_retry_config_uses_runtime_names_defaults_and_backoff_ms_alias():
    stages = [
        gen("a", retry_config={"max_retries": 2, "backoff_ms": 250}),
        gen("b", retry_config={"initial_delay_ms": 500, "backoff_ms": 9,
                               "backoff_multiplier": 1.5, "max_delay_ms": 2000}),
        gen("c", retry_config={}),
        gen("d"),
    ]
    pipeline = parse_pipeline(doc_with(*stages))
    assert pipeline.stage("a").retry == RetryPolicy(2, 250, 2.0, 30000)
    assert pipeline.stage("b").retry == RetryPolicy(3, 500, 1.5, 2000)
    assert pipeline.stage("c").retry == RetryPolicy()
    assert pipeline.stage("d").retry is None
    assert [pipeline.stage("b").retry.delay_ms(k) for k in range(4)] == [500, 750, 1125, 1687.5]
    assert pipeline.stage("a").retry.delay_ms(10) == 30000


def test_stage_settings():
    stage = gen("a", timeout_ms=30000, on_error="continue", fallback_output={"content": ""},
                enabled=False, model="m", provider="openai", name="Draft")
    parsed = parse_pipeline(doc_with(stage)).stage("a")
    assert parsed.timeout_ms == 30000 and parsed.effective_timeout_ms == 30000
    assert parsed.on_error == "continue" and parsed.fallback_output == {"content": ""}
    assert parsed.enabled is False and parsed.model == "m" and parsed.provider == "openai"
    assert parsed.name == "Draft"
    default = parse_pipeline(doc_with(gen("b"))).stage("b")
    assert default.on_error == "propagate" and default.enabled is True
    assert default.timeout_ms is None and default.effective_timeout_ms == 120000


# -- Validation errors -------------------------------------------------------------------------

@pytest.mark.parametrize("doc", [[], "text", 3, None])
def test_document_must_be_a_json_object(doc):
    message = str(refusal(doc, pipeline_id="demo"))
    assert "pipeline 'demo'" in message and "field 'document'" in message
    assert "not a JSON object" in message


@pytest.mark.parametrize("stages, what", [(None, "is missing"), ([], "is empty"),
                                          ({"a": 1}, "must be a list")])
def test_stages_missing_empty_or_not_a_list(stages, what):
    doc = {"id": "demo"} if stages is None else {"id": "demo", "stages": stages}
    message = str(refusal(doc))
    assert "pipeline 'demo'" in message and "field 'stages'" in message and what in message


def test_stage_must_be_an_object():
    assert_names(refusal(doc_with(gen("a"), "b")), "stages[1]", "stages[1]", "JSON object")


@pytest.mark.parametrize("stage_id", [None, "", 7, "has space", "a.b", "x" * 129])
def test_stage_id_missing_or_invalid(stage_id):
    stage = {"type": "logger"} if stage_id is None else {"id": stage_id, "type": "logger"}
    assert_names(refusal(doc_with(gen("a"), stage)), "stages[1]", "id")


def test_duplicate_stage_ids():
    assert_names(refusal(doc_with(gen("a"), gen("a"))), "'a'", "id", "two stages use this id")


def test_unknown_depends_on_target():
    error = refusal(doc_with(gen("a"), gen("b", depends_on=["a", "zz"])))
    assert_names(error, "'b'", "depends_on", '"zz"', "names no stage", "use one of: a, b")


@pytest.mark.parametrize("depends_on", ["a", [3]])
def test_depends_on_must_be_a_list_of_ids(depends_on):
    assert_names(refusal(doc_with(gen("a"), gen("b", depends_on=depends_on))), "'b'",
                 "depends_on")


def test_cyclic_depends_on_names_the_cycle():
    doc = doc_with(gen("start"), gen("a", depends_on=["start", "c"]),
                   gen("b", depends_on=["a"]), gen("c", depends_on=["b"]))
    assert_names(refusal(doc), "'a'", "depends_on", "cycle: a → c → b → a")


def test_self_dependency_is_a_cycle():
    assert_names(refusal(doc_with(gen("a", depends_on=["a"]))), "'a'", "depends_on",
                 "cycle: a → a")


def test_unknown_type_lists_the_known_ones():
    error = refusal(doc_with({"id": "x", "component_type": "genrator"}))
    assert_names(error, "'x'", "component_type", '"genrator"', "unknown component type",
                 "did you mean 'generator'", ", ".join(catalog.known_types()))


def test_missing_type():
    assert_names(refusal(doc_with({"id": "x", "config": {}})), "'x'", "type",
                 "no component type")


@pytest.mark.parametrize("kind", ["postgres", "mongodb", "redis", "s3", "sql", "pandas",
                                  "mcp_tool_call", "mcp-list-tools", "retriever"])
def test_unavailable_type_is_refused(kind):
    error = refusal(doc_with({"id": "x", "type": kind}))
    assert_names(error, "'x'", "type", "not available on this device", "it needs")


@pytest.mark.parametrize("value", [50, 0, -1, 600001, 10 ** 9, "30s", True, 1.5, [1]])
def test_bad_timeout_ms(value):
    assert_names(refusal(doc_with(gen("a", timeout_ms=value))), "'a'", "timeout_ms",
                 "milliseconds from 100 to 600000", "(value {})".format(json.dumps(value)))


def test_integral_float_timeout_is_accepted():
    assert parse_pipeline(doc_with(gen("a", timeout_ms=100.0))).stage("a").timeout_ms == 100


@pytest.mark.parametrize("config, field", [
    ({"max_retries": -1}, "retry_config.max_retries"),
    ({"max_retries": 11}, "retry_config.max_retries"),
    ({"max_retries": "3"}, "retry_config.max_retries"),
    ({"max_retries": True}, "retry_config.max_retries"),
    ({"initial_delay_ms": -5}, "retry_config.initial_delay_ms"),
    ({"backoff_ms": "fast"}, "retry_config.backoff_ms"),
    ({"max_delay_ms": 10 ** 10}, "retry_config.max_delay_ms"),
    ({"backoff_multiplier": 0.5}, "retry_config.backoff_multiplier"),
    ({"backoff_multiplier": "2"}, "retry_config.backoff_multiplier"),
    ({"backoff_multiplier": float("nan")}, "retry_config.backoff_multiplier"),
    ([1], "retry_config"),
])
def test_bad_retry_config(config, field):
    assert_names(refusal(doc_with(gen("a", retry_config=config))), "'a'", field)


@pytest.mark.parametrize("value", ["retry", "fail", "CONTINUE", 1])
def test_bad_on_error(value):
    assert_names(refusal(doc_with(gen("a", on_error=value))), "'a'", "on_error",
                 '"propagate"', '"continue"')


def test_bad_enabled_and_parameter_objects():
    error = refusal(doc_with(gen("a", enabled="no"), gen("b", input_mapping=["x"]),
                             gen("c", config="prompt")))
    assert_names(error, "'a'", "enabled")
    assert_names(error, "'b'", "input_mapping")
    assert_names(error, "'c'", "config")


def test_bad_llm_settings():
    error = refusal(doc_with(gen("a", llm_settings={"temperature": 3}),
                             gen("b", llm_settings={"max_tokens": 0})))
    assert_names(error, "'a'", "llm_settings.temperature")
    assert_names(error, "'b'", "llm_settings.max_tokens")


def test_output_stage_id_must_name_a_stage():
    message = str(refusal(doc_with(gen("a"), output_stage_id="nope")))
    assert "pipeline 'demo'" in message and "field 'output_stage_id'" in message
    assert '"nope"' in message and "use one of: a" in message


def test_empty_output_stage_id_means_unset():
    assert parse_pipeline(doc_with(gen("a"), output_stage_id="")).output_stage_id is None


def test_pipeline_needs_an_id_or_a_name():
    message = str(refusal({"stages": [gen("a")]}))
    assert "pipeline '<unnamed>'" in message and "field 'id'" in message


def test_multiple_problems_are_reported_together():
    error = refusal(doc_with(gen("a", timeout_ms=1), gen("b", on_error="x"),
                             {"id": "c", "type": "nope"}))
    assert "(3 problems)" in str(error)
    assert [(p["stage"], p["field"]) for p in error.problems] == [
        ("'a'", "timeout_ms"), ("'b'", "on_error"), ("'c'", "type")]
    assert error.pipeline_id == "demo" and error.code == "invalid_pipeline"


# -- Control-flow references (semantics §4.4) -----------------------------------------------------

def control(stage_id, kind, depends_on=(), **inputs):
    return {"id": stage_id, "type": kind, "depends_on": list(depends_on),
            "input_mapping": inputs}


@pytest.mark.parametrize("kind, field, inputs", [
    ("conditional", "true_branch_stages", {"condition": True, "true_branch_stages": ["zz"]}),
    ("conditional", "false_branch_stages", {"condition": True, "false_branch_stages": ["zz"]}),
    ("foreach", "loop_stages", {"items": [], "loop_stages": ["zz"]}),
    ("trycatch", "try_stages", {"try_stages": ["zz"]}),
    ("trycatch", "catch_stages", {"try_stages": ["a"], "catch_stages": ["zz"]}),
    ("trycatch", "finally_stages", {"try_stages": ["a"], "finally_stages": ["zz"]}),
    ("router", "default_route", {"value": 1, "routes": {}, "default_route": ["zz"]}),
    ("router", "routes.x", {"value": 1, "routes": {"x": ["a", "zz"]}}),
])
def test_control_flow_fields_must_name_existing_stages(kind, field, inputs):
    doc = doc_with(control("cf", kind, **inputs), gen("a", depends_on=["cf"]))
    assert_names(refusal(doc), "'cf'", field, '"zz"', "names no stage")


def test_control_flow_stage_cannot_name_itself():
    doc = doc_with(control("cf", "foreach", items=[], loop_stages=["cf"]))
    assert_names(refusal(doc), "'cf'", "loop_stages", "cannot name itself")


@pytest.mark.parametrize("inputs, field", [
    ({"value": 1, "routes": ["a"]}, "routes"),
    ({"value": 1, "routes": {"x": "a"}}, "routes.x"),
    ({"value": 1, "routes": {}, "default_route": "a"}, "default_route"),
])
def test_router_fields_have_the_right_shape(inputs, field):
    doc = doc_with(control("cf", "router", **inputs), gen("a", depends_on=["cf"]))
    assert_names(refusal(doc), "'cf'", field, "must be")


def test_templated_stage_lists_are_left_for_run_time():
    doc = doc_with(control("cf", "foreach", items=[], loop_stages="{{input.body}}"))
    assert parse_pipeline(doc).stage("cf").inputs["loop_stages"] == "{{input.body}}"


def test_branch_not_downstream_of_its_control_stage_is_a_warning():
    doc = doc_with(gen("a"), gen("b"),
                   control("gate", "conditional", ["a"], condition=True,
                           true_branch_stages=["b"], false_branch_stages=["c"]),
                   gen("c", depends_on=["gate"]))
    warnings = parse_pipeline(doc).warnings
    assert len(warnings) == 1 and "'b'" in warnings[0] and "'gate'" in warnings[0]


# -- Inheritance (semantics §1.12) ---------------------------------------------------------------

BASE = {"name": "base-review", "version": "1.0.0", "abstract": True,
        "input_schema": {"type": "object", "properties": {"topic": {"type": "string"}},
                         "required": ["topic"]},
        "tags": ["review", "base"], "output_stage_id": "review",
        "stages": [{"id": "draft", "type": "generator",
                    "input_mapping": {"prompt": "{{input.topic}}"}},
                   {"id": "review", "type": "critic", "depends_on": ["draft"],
                    "input_mapping": {"content": "{{upstream.draft.content}}"}}]}

CHILD = {"name": "tech-review", "version": "1.0.0", "extends": "base-review@1.0.0",
         "input_schema": {"properties": {"audience": {"type": "string"}},
                          "required": ["audience"]},
         "tags": ["tech", "review"],
         "overrides": {"draft": {"input_mapping": {"system_prompt": "You are a senior engineer."}}},
         "stages": [{"id": "polish", "type": "improver", "depends_on": ["review"],
                     "input_mapping": {"content": "{{upstream.draft.content}}",
                                       "feedback": "{{upstream.review.feedback}}"}}]}


def store(*docs):
    by_ref = {}
    for doc in docs:
        by_ref[doc.get("id") or doc["name"]] = doc
    return by_ref.get


def test_abstract_pipeline_is_parsed_and_flagged():
    pipeline = parse_pipeline(BASE)
    assert pipeline.abstract is True and pipeline.stage_ids == ("draft", "review")


def test_extends_with_overrides_resolves_as_the_reference_example():
    pipeline = parse_pipeline(CHILD, lookup=store(BASE))
    assert pipeline.stage_ids == ("draft", "review", "polish")
    assert pipeline.stage("draft").inputs == {"prompt": "{{input.topic}}",
                                              "system_prompt": "You are a senior engineer."}
    assert pipeline.abstract is False                   # the child's flag, not the parent's
    assert pipeline.extends == "base-review@1.0.0"
    assert pipeline.id == "tech-review" and pipeline.output_stage_id == "review"
    assert pipeline.input_schema == {
        "type": "object", "properties": {"topic": {"type": "string"},
                                         "audience": {"type": "string"}},
        "required": ["topic", "audience"]}
    assert pipeline.tags == ("review", "base", "tech")
    assert "extends" not in pipeline.resolved and "overrides" not in pipeline.resolved
    assert pipeline.raw == CHILD                        # what was given is what is hashed


def test_child_stage_replaces_the_parent_stage_wholesale():
    child = {"name": "c", "extends": "base-review",
             "stages": [{"id": "draft", "type": "summarizer",
                         "input_mapping": {"text": "{{input.topic}}"}}]}
    pipeline = parse_pipeline(child, lookup=store(BASE))
    assert pipeline.stage_ids == ("draft", "review")
    assert pipeline.stage("draft").type == "summarizer"
    assert pipeline.stage("draft").inputs == {"text": "{{input.topic}}"}


def test_override_of_input_mapping_survives_a_parent_written_with_config():
    parent = {"name": "p", "stages": [{"id": "s", "component_type": "generator",
                                       "config": {"prompt": "old", "max_tokens": 10}}]}
    child = {"name": "c", "extends": "p",
             "overrides": {"s": {"input_mapping": {"prompt": "new"}}}}
    assert parse_pipeline(child, lookup=store(parent)).stage("s").inputs == {
        "prompt": "new", "max_tokens": 10}


def test_override_of_an_unknown_stage_is_a_warning():
    child = {"name": "c", "extends": "base-review", "overrides": {"ghost": {"timeout_ms": 200}}}
    pipeline = parse_pipeline(child, lookup=store(BASE))
    assert any("'ghost'" in warning for warning in pipeline.warnings)


def test_multi_level_inheritance():
    middle = {"name": "middle", "extends": "base-review",
              "overrides": {"review": {"input_mapping": {"criteria": ["accuracy"]}}}}
    leaf = {"name": "leaf", "extends": "middle", "overrides": {"review": {"timeout_ms": 5000}}}
    pipeline = parse_pipeline(leaf, lookup=store(BASE, middle))
    review = pipeline.stage("review")
    assert review.inputs["criteria"] == ["accuracy"] and review.timeout_ms == 5000
    assert pipeline.abstract is False


def test_inheritance_cycle_is_refused():
    first = {"id": "demo", "extends": "other", "stages": [gen("a")]}
    other = {"id": "other", "extends": "demo", "stages": [gen("b")]}
    message = str(refusal(first, lookup=store(first, other)))
    assert "field 'extends'" in message and "circular: demo → other → demo" in message


def test_missing_parent_and_no_store():
    doc = {"id": "demo", "extends": "ghost@2.0.0"}
    for lookup in (store(BASE), None):
        message = str(refusal(doc, lookup=lookup))
        assert "pipeline 'demo'" in message and "field 'extends'" in message
        assert "not on this device" in message and "add the parent pipeline 'ghost'" in message


def test_extends_version_must_match_the_stored_parent():
    doc = {"id": "demo", "extends": "base-review@2.0.0"}
    message = str(refusal(doc, lookup=store(BASE)))
    assert "version 2.0.0" in message and "version 1.0.0" in message


@pytest.mark.parametrize("field, value", [("extends", 5), ("abstract", "yes"),
                                          ("overrides", ["x"])])
def test_bad_inheritance_fields(field, value):
    message = str(refusal(doc_with(gen("a"), **{field: value})))
    assert "pipeline 'demo'" in message and "field '{}'".format(field) in message


def test_invalid_parent_stage_is_reported_against_the_child():
    parent = {"name": "p", "stages": [gen("a", timeout_ms=5)]}
    assert_names(refusal({"id": "demo", "extends": "p"}, lookup=store(parent)), "'a'",
                 "timeout_ms")


# -- Waves (semantics §3.2) --------------------------------------------------------------------------

def test_waves_follow_the_reference_rule():
    doc = doc_with(gen("fetch"), gen("left", depends_on=["fetch"]),
                   gen("solo"), gen("right", depends_on=["fetch"]),
                   gen("late", depends_on=["left", "solo"]),
                   gen("join", depends_on=["right", "late"]))
    assert topological_waves(parse_pipeline(doc)) == [
        ["fetch", "solo"], ["left", "right"], ["late"], ["join"]]


def test_waves_keep_declaration_order_even_when_dependents_come_first():
    doc = doc_with(gen("c", depends_on=["b"]), gen("b", depends_on=["a"]), gen("a"))
    assert topological_waves(parse_pipeline(doc)) == [["a"], ["b"], ["c"]]


def test_long_chain_does_not_hit_the_recursion_limit():
    stages = [gen("s0")] + [gen("s{}".format(i), depends_on=["s{}".format(i - 1)])
                            for i in range(1, 3000)]
    waves = topological_waves(validate_document(doc_with(*stages)))
    assert len(waves) == 3000 and waves[-1] == ["s2999"]


# -- Hashing ---------------------------------------------------------------------------------------

def test_pipeline_sha256_is_canonical_json():
    doc = {"b": 1, "a": {"é": [1, 2]}, "name": "x"}
    reordered = {"name": "x", "a": {"é": [1, 2]}, "b": 1}
    expected = hashlib.sha256('{"a":{"é":[1,2]},"b":1,"name":"x"}'.encode("utf-8")).hexdigest()
    assert pipeline_sha256(doc) == pipeline_sha256(reordered) == expected
    assert pipeline_sha256(parse_pipeline(doc_with(gen("a")))) == pipeline_sha256(
        doc_with(gen("a")))


# -- The 24 gallery templates of flowmason 1.0.24 ------------------------------------------------------

def test_all_24_gallery_templates_are_accepted():
    templates = require_gallery()
    assert sorted(templates) == sorted(TEMPLATE_NAMES)
    for name, doc in templates.items():
        pipeline = validate_document(doc)
        assert pipeline.id == name
        assert pipeline.output_stage_id in pipeline.stage_ids
        assert sum(len(wave) for wave in topological_waves(pipeline)) == len(pipeline.stages)
        assert not any(catalog.is_unavailable(stage.type) for stage in pipeline.stages)


def test_gallery_spellings_and_external_services():
    templates = require_gallery()
    declared = {stage["component_type"] for doc in templates.values() for stage in doc["stages"]}
    assert {"json-transform", "http-request", "schema-validate", "variable-set",
            "synthesizer"} <= declared
    with_http = {name for name, doc in templates.items()
                 if any(stage.type == "http_request"
                        for stage in parse_pipeline(doc).stages)}
    assert with_http == NEEDS_EXTERNAL_SERVICE and len(with_http) == 5
    offline = set(templates) - with_http
    assert len(offline) == 19
    for name in offline:
        stages = parse_pipeline(templates[name]).stages
        assert {catalog.category(stage.type) for stage in stages} <= {"llm", "operator"}


def test_gallery_quirks_are_warnings_not_errors():
    templates = require_gallery()
    cicd = parse_pipeline(templates["devops-cicd-deployment"])
    assert any("error_handling" in warning for warning in cicd.warnings)
    assert all(stage.retry is None for stage in cicd.stages)
    monitor = parse_pipeline(templates["devops-health-monitor"])
    assert any("'health-check'" in warning for warning in monitor.warnings)
    multi = parse_pipeline(templates["multi-draft-selector"])
    assert [multi.stage(s).temperature for s in ("draft1", "draft2", "draft3")] == [0.9, 0.7, 0.3]
