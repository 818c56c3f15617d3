"""``{{ ... }}`` templates and type coercion (fmedge/pipeline/template.py).

Pins flowmason-semantics.md §2.2-2.6 and the quick checks of §7 that concern templates,
with the fixes design.md §5 decides: the ``stages`` namespace, array indexes, hyphenated
stage ids, expressions inside the braces, JSON rendering of objects in mixed strings.
"""

import copy

import pytest

from fmedge.errors import ExecutionError, ExpressionError, TemplateError
from fmedge.pipeline.template import (
    TemplateScope, coerce, compile_template, has_templates, render_string, resolve, to_text)

INPUT = {"n": 5, "d": {"a": "x"}, "b": True, "z": None, "p": 0.5, "text": "hi",
         "items": [10, 20, 30], "count": 5, "tickets": [{"id": "T1", "tags": ["a", "b"]}]}
UPSTREAM = {
    "prepare-batch": {"batches": [["a", "b"], ["c"]], "total_batches": 2},
    "triage": {"route_taken": "billing", "score": 0.9},
    "gate": {"skipped": True, "reason": "control_flow"},
}
CONTEXT = {"run_id": "run-1", "pipeline_id": "pipe", "stage_id": "notify",
           "service": {"url": "http://svc"}}


@pytest.fixture
def scope():
    return TemplateScope(input=INPUT, upstream=UPSTREAM, env={"DEPLOY_ENV": "prod"},
                         context=CONTEXT, clock=lambda: 1700000000.0)


# ---------------------------------------------------------------------------------------
# Whole value vs interpolation (§2.3)


@pytest.mark.parametrize("template, expected", [
    ("{{input.n}}", 5),
    ("{{input.b}}", True),
    ("{{input.z}}", None),
    ("{{input.p}}", 0.5),
    ("{{input.d}}", {"a": "x"}),
    ("{{input.items}}", [10, 20, 30]),
    ("  {{ input.n }}  ", 5),            # quick check 3: outer whitespace is ignored
    ("\n{{input.d}}\t", {"a": "x"}),
    ("{{input}}", INPUT),
    ("{{upstream.gate}}", {"skipped": True, "reason": "control_flow"}),  # quick check 9
])
def test_a_lone_template_keeps_the_json_type(scope, template, expected):
    assert render_string(template, scope) == expected


def test_mixed_strings_render_scalars_like_the_reference_and_objects_as_json(scope):
    # Quick check 2, with the design's JSON rendering of objects (reference: Python repr).
    assert render_string("n={{input.n}} d={{input.d}} b={{input.b}} z={{input.z}}", scope) \
        == 'n=5 d={"a": "x"} b=True z='
    assert render_string("{{input.items}}!", scope) == "[10, 20, 30]!"
    assert render_string("p={{input.p}} f={{input.b}}{{input.b}}", scope) == "p=0.5 f=TrueTrue"
    assert render_string("t: {{input.tickets}}", scope) == \
        't: [{"id": "T1", "tags": ["a", "b"]}]'


@pytest.mark.parametrize("value, text", [
    ("x", "x"), (None, ""), (True, "True"), (False, "False"), (5, "5"), (0.5, "0.5"),
    (1e20, "1e+20"), ({"a": None, "ok": True}, '{"a": null, "ok": true}'),
    ([1, "y"], '[1, "y"]'), ({"s": "é\n"}, '{"s": "é\\n"}'),
])
def test_to_text(value, text):
    assert to_text(value) == text


def test_text_without_templates_is_returned_unchanged(scope):
    text = "no templates { here } {x}"
    assert render_string(text, scope) is text


@pytest.mark.parametrize("text", ["{{}}", "a {{ b", "}} {{", "{{ 'never closed }}"])
def test_unclosed_or_empty_braces_are_plain_text(scope, text):
    assert render_string(text, scope) == text


def test_whitespace_only_template_is_an_error(scope):
    with pytest.raises(TemplateError, match="empty"):
        render_string("{{  }}", scope)


# ---------------------------------------------------------------------------------------
# Namespaces and paths (§2.2)


@pytest.mark.parametrize("template, expected", [
    ("{{input.text}}", "hi"),
    ("{{upstream.triage.route_taken}}", "billing"),
    ("{{stages.triage.output.route_taken}}", "billing"),
    ("{{stages.triage.output}}", {"route_taken": "billing", "score": 0.9}),
    ("{{env.DEPLOY_ENV}}", "prod"),
    ("{{context.run_id}}", "run-1"),
    ("{{context.service.url}}", "http://svc"),
    ("{{upstream.triage}}", {"route_taken": "billing", "score": 0.9}),
    # Arrays: numeric segments and [i] (the reference cannot index arrays).
    ("{{input.items.0}}", 10),
    ("{{input.items[2]}}", 30),
    ("{{input.tickets.0.tags[1]}}", "b"),
    ("{{input.tickets[0].id}}", "T1"),
    # Hyphenated stage ids are keys, never subtraction.
    ("{{upstream.prepare-batch.batches[0]}}", ["a", "b"]),
    ("{{upstream.prepare-batch.batches.1.0}}", "c"),
    ("{{stages.prepare-batch.output.total_batches}}", 2),
])
def test_paths(scope, template, expected):
    assert render_string(template, scope) == expected


def test_a_key_holding_null_resolves_to_null(scope):
    assert render_string("{{input.z}}", scope) is None


def test_whole_namespaces(scope):
    assert render_string("{{upstream}}", scope) == UPSTREAM
    assert render_string("{{context}}", scope) == CONTEXT
    assert render_string("{{stages}}", scope)["triage"] == {"output": UPSTREAM["triage"]}


def test_a_hyphenated_key_wins_over_arithmetic_but_arithmetic_still_works():
    data = TemplateScope(input={"count": 5, "a-b": "key"})
    assert render_string("{{input.a-b}}", data) == "key"
    assert render_string("{{input.count-1}}", data) == 4


# ---------------------------------------------------------------------------------------
# Missing values (§2.4): errors name the path and what was there


def _error(scope, template):
    with pytest.raises(TemplateError) as caught:
        render_string(template, scope)
    return str(caught.value)


def test_missing_input_key_names_the_path_and_the_available_keys(scope):
    message = _error(scope, "{{input.missing}}")
    assert "input.missing" in message
    assert "input has no key 'missing'" in message
    assert "n, d, b, z" in message
    assert "{{input.missing or <default>}}" in message


def test_missing_stage_explains_depends_on(scope):
    message = _error(scope, "{{upstream.draft.content}}")
    assert "upstream.draft.content" in message
    assert "prepare-batch, triage, gate" in message
    assert "depends_on" in message


def test_missing_field_of_a_hyphenated_stage_is_not_treated_as_subtraction(scope):
    message = _error(scope, "{{upstream.prepare-batch.nope}}")
    assert "upstream.prepare-batch has no key 'nope' (available: batches, total_batches)" \
        in message


def test_missing_hyphenated_stage_is_reported_as_missing(scope):
    message = _error(scope, "{{upstream.fetch-data.body}}")
    assert "upstream has no key 'fetch-data'" in message


def test_index_out_of_range(scope):
    message = _error(scope, "{{input.items.7}}")
    assert "input.items is an array of length 3" in message


def test_navigating_through_a_scalar(scope):
    message = _error(scope, "{{input.n.x}}")
    assert "input.n is a number, which has no key 'x'" in message


def test_skipped_stage_fields_are_missing(scope):
    # Semantics §3.6: a deeper path into a skip marker fails.
    assert "upstream.gate has no key 'content'" in _error(scope, "{{upstream.gate.content}}")


def test_env_reads_only_allow_listed_names(scope):
    message = _error(scope, "{{env.FLOWMASON_API_KEY}}")
    assert "allow-list" in message
    assert "env" in _error(scope, "{{env}}")
    assert "env.NAME" in _error(scope, "{{env.DEPLOY_ENV.x}}")


def test_unknown_namespace_suggests_upstream(scope):
    message = _error(scope, "{{fetch.output.body}}")
    assert "unknown namespace 'fetch'" in message
    assert "{{upstream.fetch.body}}" in message
    assert "unknown namespace 'variables'" in _error(scope, "{{variables.x}}")


def test_stages_namespace_needs_output(scope):
    assert "stages.triage has no key 'route_taken' (available: output)" in \
        _error(scope, "{{stages.triage.route_taken}}")


# ---------------------------------------------------------------------------------------
# Expressions inside the braces (design §5)


@pytest.mark.parametrize("template, expected", [
    ("{{now()}}", "2023-11-14T22:13:20.000+00:00"),
    ("{{input.channel or 'web'}}", "web"),
    ("{{input.text or 'web'}}", "hi"),
    ("{{len(input.items)}}", 3),
    ("{{input.n * 2}}", 10),
    ("{{input.mode or 'auto'}}", "auto"),
    ("{{ 'escalated' if upstream.triage.score > 0.5 else 'auto' }}", "escalated"),
    ("{{upstream.prepare-batch.batches[1] if len(upstream.prepare-batch.batches) > 1 "
     "else '[]'}}", ["c"]),
    ("{{stages.prepare-batch.output.total_batches + 1}}", 3),
    ("{{input.schema or {'title': 'string', 'n': 1}}}", {"title": "string", "n": 1}),
    ("{{ '}}' + '{{' }}", "}}{{"),
    ("{{[t['id'] for t in input.tickets]}}", ["T1"]),
    ("{{math.pi > 3}}", True),
    ("{{True}}", True),
    ("{{context.service.url.upper()}}", "HTTP://SVC"),
    ("{{input.count-1 if True else 0}}", 4),
])
def test_expressions(scope, template, expected):
    assert render_string(template, scope) == expected


def test_expressions_in_mixed_strings(scope):
    assert render_string("at {{now()}} via {{input.channel or 'web'}} ({{len(input.items)}})",
                         scope) == "at 2023-11-14T22:13:20.000+00:00 via web (3)"


def test_inside_an_expression_a_missing_key_is_null_but_a_path_is_strict(scope):
    assert render_string("{{input.missing or 'dflt'}}", scope) == "dflt"
    assert render_string("{{input.missing is None}}", scope) is True
    with pytest.raises(TemplateError):
        render_string("{{input.missing}}", scope)


def test_expression_errors_name_the_expression(scope):
    with pytest.raises(ExpressionError, match="len"):
        render_string("{{len(input.n)}}", scope)
    with pytest.raises(ExpressionError, match="not allowed"):
        render_string("{{input.__class__ or 1}}", scope)


def test_a_path_template_only_reads_dict_keys(scope):
    # Path templates never touch attributes: a dunder is just a key that is not there.
    with pytest.raises(TemplateError, match="input has no key '__class__'"):
        render_string("{{input.__class__}}", scope)


def test_extra_namespaces_for_component_templates():
    scope = TemplateScope(input={}, extra={"data": {"items": [1, 2]}, "input": "ignored"})
    assert render_string("{{data.items.1}}", scope) == 2
    assert render_string("{{len(data.items) if data.items else 0}}", scope) == 2
    assert render_string("{{input}}", scope) == {}
    with pytest.raises(TemplateError, match="unknown namespace 'data'"):
        render_string("{{data.items}}", TemplateScope())


# ---------------------------------------------------------------------------------------
# Recursive resolution


def test_resolve_walks_dicts_and_lists_and_keeps_other_values(scope):
    params = {
        "message": "Ticket {{input.tickets.0.id}} routed to {{upstream.triage.route_taken}}",
        "level": "INFO",
        "data": {"raw": "{{upstream.triage}}", "run": "{{context.run_id}}"},
        "tags": {"env": "{{env.DEPLOY_ENV}}"},
        "list": ["{{input.n}}", 7, None, True, ["{{input.b}}"]],
        "{{input.text}}": "keys are not templates",
    }
    original = copy.deepcopy(params)
    assert resolve(params, scope) == {
        "message": "Ticket T1 routed to billing",
        "level": "INFO",
        "data": {"raw": {"route_taken": "billing", "score": 0.9}, "run": "run-1"},
        "tags": {"env": "prod"},
        "list": [5, 7, None, True, [True]],
        "{{input.text}}": "keys are not templates",
    }
    assert params == original


def test_resolve_passes_scalars_through(scope):
    assert resolve(3, scope) == 3
    assert resolve(None, scope) is None
    assert resolve((1, "{{input.n}}"), scope) == [1, 5]


def test_has_templates():
    assert has_templates("a {{input.x}}")
    assert has_templates({"a": [1, {"b": "{{upstream.s.x}}"}]})
    assert not has_templates({"a": [1, {"b": "plain {x}"}]})
    assert not has_templates("{{}}")
    assert has_templates("{{ }}")          # a (bad) template: has_templates does not compile
    assert not has_templates(5)


def test_compiled_templates_are_cached(scope):
    template = "Hello {{input.text}}"
    assert compile_template(template) is compile_template(template)
    assert compile_template(template).render(scope) == "Hello hi"
    assert compile_template(template).render(TemplateScope(input={"text": "yo"})) == "Hello yo"


def test_scope_defaults_are_empty_namespaces():
    empty = TemplateScope()
    assert render_string("{{input}}", empty) == {}
    assert render_string("{{upstream}}", empty) == {}


# ---------------------------------------------------------------------------------------
# Coercion (§2.6)


@pytest.mark.parametrize("value, type_name, expected", [
    ("text", "str", "text"),
    (5, "str", "5"),                      # quick check 1: lenient, the reference refuses
    (True, "str", "True"),
    ({"a": 1}, "str", '{"a": 1}'),
    (3, "int", 3),
    ("3", "int", 3),
    (" 3.0 ", "int", 3),
    (4.0, "int", 4),
    (True, "int", 1),
    (2.5, "float", 2.5),
    (2, "float", 2.0),
    ("1e3", "float", 1000.0),
    (True, "bool", True),
    ("yes", "bool", True),
    (" Enabled ", "bool", True),
    ("OFF", "bool", False),
    ("0", "bool", False),
    (1, "bool", True),                    # lenient: the reference refuses numbers
    ([1, 2], "list", [1, 2]),
    ((1, 2), "list", [1, 2]),
    ('["clarity"]', "list", ["clarity"]),   # quick check 6
    ("clarity, tone", "list", ["clarity", "tone"]),   # quick check 6, lenient
    ("single", "list[str]", ["single"]),
    ("", "list", []),
    (["1", 2], "list[int]", [1, 2]),
    ({"a": 1}, "dict", {"a": 1}),
    ('{"a": "2"}', "dict[str, int]", {"a": 2}),
    ({"x": [1]}, "any", {"x": [1]}),
    (None, "int?", None),
    (None, "Optional[str]", None),
    (None, "list | None", None),
    (3, "number", 3),
    (0.5, "number", 0.5),
    ("7", "number", 7),
    (" 2.5", "number", 2.5),
    ("5", "integer", 5),
    ("x", "string", "x"),
    ([1], "array", [1]),
])
def test_coercion(value, type_name, expected):
    result = coerce(value, type_name, field="f")
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("value, type_name, expected_in_message", [
    ("3.5", "int", "whole number"),
    (3.5, "int", "whole number"),
    ("abc", "int", "whole number"),
    ([1], "int", "whole number"),
    ("abc", "float", "number"),
    (True, "number", "number"),
    ("many", "number", "number"),
    ("maybe", "bool", "true/false"),
    (2, "bool", "true/false"),
    ({"a": 1}, "list", "array"),
    (5, "list", "array"),
    ("not json", "dict", "object"),
    ('["a"]', "dict", "object"),
    (None, "any", "required"),            # quick check 7
    (None, "str", "required"),
    (["x", "y"], "list[int]", "f[0]"),
])
def test_coercion_errors(value, type_name, expected_in_message):
    with pytest.raises(ExecutionError) as caught:
        coerce(value, type_name, field="f")
    assert caught.value.code == "coercion_error"
    assert "Field 'f" in str(caught.value)
    assert expected_in_message in str(caught.value)


def test_coercion_error_message_names_field_value_and_type():
    with pytest.raises(ExecutionError) as caught:
        coerce("3.5", "int", field="max_tokens")
    assert str(caught.value) == ("Field 'max_tokens': cannot use string '3.5' as int: "
                                 "expected a whole number such as 3 or \"3\"")


def test_choices_match_case_insensitively_and_return_the_declared_spelling():
    levels = ["debug", "info", "warning", "error"]
    assert coerce("INFO", "str", field="level", choices=levels) == "info"
    assert coerce("2", "any", field="n", choices=[1, 2]) == 2
    assert coerce(None, "str?", field="level", choices=levels) is None
    with pytest.raises(ExecutionError, match="'debug', 'info'"):
        coerce("loud", "str", field="level", choices=levels)


def test_unknown_type_names_are_reported():
    with pytest.raises(ExecutionError, match="cannot check"):
        coerce(1, "complex", field="f")
    with pytest.raises(ExecutionError, match="cannot check"):
        coerce(1, "int | str", field="f")


# ---------------------------------------------------------------------------------------
# The reference's quick checks (§7) that concern templates, as fm-edge decides them


def test_quick_check_4_paths(scope):
    assert render_string("{{input.items.0}}", scope) == 10   # extension: arrays indexable
    with pytest.raises(TemplateError):
        render_string("{{input.missing}}", scope)
    with pytest.raises(TemplateError):
        render_string("{{stages.x.output}}", scope)             # x has not run
    assert render_string("{{stages.triage.output.score}}", scope) == 0.9


def test_quick_check_8_condition_value_keeps_its_type():
    assert render_string("{{input.flag}}", TemplateScope(input={"flag": False})) is False
    assert render_string("flag={{input.flag}}", TemplateScope(input={"flag": False})) == \
        "flag=False"


# ---------------------------------------------------------------------------------------
# The 24 gallery templates: every {{ ... }} they contain compiles


def test_every_gallery_template_string_compiles():
    from tests.gallery import require_gallery

    documents = require_gallery()
    count = 0
    for name, document in documents.items():
        for stage in document.get("stages", []):
            for text in _strings(stage.get("config", {})):
                if "{{" in text:
                    compile_template(text)   # raises on anything not understood
                    count += 1
    assert count > 200


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
