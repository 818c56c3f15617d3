"""The LLM nodes (semantics §4.1, §4.2) against the deterministic ScriptedAdapter.

Components are called without the executor: ``run_stage`` parses a one-stage pipeline,
coerces the literal inputs to the declared fields, applies defaults and calls ``run``
with a StageContext over a small real services object.
"""

import asyncio
import hashlib
import json
import math
import re
from types import SimpleNamespace

import pytest

from fmedge.errors import LLMError, ModelNotFoundError
from fmedge.pipeline import catalog, expr
from fmedge.pipeline.components import get_component
from fmedge.pipeline.components.base import MappingError, StageContext
from fmedge.pipeline.components.llm_json import (as_bool, as_fraction, as_text_list,
                                                 extract_array, extract_object)
from fmedge.pipeline.document import parse_pipeline
from fmedge.pipeline.template import coerce
from tests.gallery import NEEDS_EXTERNAL_SERVICE, require_gallery
from tests.llm_double import ScriptedAdapter, default_reply

LLM_NODES = ("generator", "critic", "improver", "selector", "combiner", "analyzer", "chat",
             "rewriter", "summarizer", "translator", "embedder", "compliance_evaluator")


# -- Harness --------------------------------------------------------------------------------

class Services:
    """What the executor gives a StageContext, reduced to recording lists."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.models_asked = []
        self.usage = []
        self.logs = []

    def llm_adapter(self, stage, model):
        self.models_asked.append(model)
        return self.adapter

    def add_usage(self, stage_id, prompt_tokens, completion_tokens, model):
        self.usage.append((stage_id, prompt_tokens, completion_tokens, model))

    def log(self, stage_id, level, message, data):
        self.logs.append((stage_id, level, message, data))

    def evaluate(self, expression, names):
        return expr.evaluate(expression, names)

    def cancelled(self):
        return False


class Outcome:
    def __init__(self, output, services, adapter):
        self.output = output
        self.services = services
        self.adapter = adapter

    @property
    def call(self):
        assert len(self.adapter.calls) == 1, self.adapter.calls
        return self.adapter.calls[0]

    @property
    def warnings(self):
        return [entry for entry in self.services.logs if entry[1] == "warning"]


def run_stage(stage_type, inputs, adapter=None, **stage_fields):
    """Run one stage of ``stage_type`` with literal ``inputs``; returns an Outcome."""
    adapter = adapter if adapter is not None else ScriptedAdapter()
    services = Services(adapter)
    stage_doc = {"id": "s1", "type": stage_type, "input_mapping": inputs}
    stage_doc.update(stage_fields)
    stage = parse_pipeline({"name": "llm-test", "stages": [stage_doc]}).stages[0]
    spec = get_component(stage.type)
    ctx = StageContext(stage, _field_values(spec, stage.inputs), SimpleNamespace(run_id="r1"),
                       {}, services)
    result = spec.run(ctx)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return Outcome(result, services, adapter)


def _field_values(spec, given):
    values = {}
    for name, field in spec.fields.items():
        if name in given:
            values[name] = coerce(given[name], field.type, field=name)
        elif field.required:
            raise MappingError("field {!r} is required".format(name))
        else:
            values[name] = field.default_value()
    return values


def failing(stage_type, inputs, adapter=None, **stage_fields):
    with pytest.raises(Exception) as caught:
        run_stage(stage_type, inputs, adapter, **stage_fields)
    return caught.value


# -- Registry and catalogue -----------------------------------------------------------------

def test_every_available_text_llm_type_is_implemented():
    for name in catalog.known_types():
        if catalog.needs_llm(name) and not catalog.is_unavailable(name):
            assert get_component(name) is not None, name
    assert set(LLM_NODES) <= set(catalog.available_types())
    assert get_component(catalog.canonical_type("synthesizer")).type == "combiner"


# -- Calling the model: settings, usage, failures -------------------------------------------

def test_generator_outputs_and_default_settings():
    outcome = run_stage("generator", {"prompt": "Write a haiku", "system_prompt": "Be brief"})
    call, out = outcome.call, outcome.output
    assert set(out) == {"content", "tokens_used", "finish_reason", "model"}
    assert out["content"] == default_reply("Write a haiku")
    assert out["finish_reason"] == "stop" and out["model"] == "scripted-model"
    assert (call.prompt, call.system, call.temperature, call.max_tokens) == \
        ("Write a haiku", "Be brief", 0.7, 4096)
    assert (call.seed, call.stop, call.json) == (None, None, False)
    prompt_tokens, completion_tokens = 5, len(out["content"].split())
    assert out["tokens_used"] == prompt_tokens + completion_tokens
    assert outcome.services.usage == [("s1", prompt_tokens, completion_tokens, "scripted-model")]


def test_stage_llm_settings_override_the_node_defaults():
    outcome = run_stage("critic", {"content": "x"}, model="tiny:1b",
                        llm_settings={"temperature": 0.9, "max_tokens": 99, "seed": 7,
                                      "stop": ["END"]})
    call = outcome.call
    assert (call.temperature, call.max_tokens, call.seed, call.stop) == (0.9, 99, 7, ["END"])
    assert call.model == "tiny:1b" and outcome.services.models_asked == ["tiny:1b"]


def test_an_input_set_by_the_stage_wins_over_llm_settings():
    outcome = run_stage("generator", {"prompt": "p", "temperature": 0.1,
                                      "stop_sequences": ["##"]},
                        llm_settings={"temperature": 0.9, "max_tokens": 64})
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.1, 64)
    assert outcome.call.stop == ["##"]


@pytest.mark.parametrize("settings, field", [({"seed": "abc"}, "seed"),
                                             ({"stop": [1]}, "stop")])
def test_bad_llm_settings_name_the_setting(settings, field):
    error = failing("generator", {"prompt": "p"}, llm_settings=settings)
    assert isinstance(error, MappingError) and "llm_settings." + field in str(error)


@pytest.mark.parametrize("inputs, field", [({"temperature": 2.5}, "temperature"),
                                           ({"max_tokens": 0}, "max_tokens")])
def test_generator_bounds(inputs, field):
    error = failing("generator", dict(prompt="p", **inputs))
    assert isinstance(error, MappingError) and field in str(error)
    assert not error.retryable


@pytest.mark.parametrize("node, inputs", [
    ("generator", {"prompt": "p"}),
    ("critic", {"content": "c"}),
    ("selector", {"candidates": ["a", "b"]}),
    ("summarizer", {"text": "t"}),
])
def test_backend_failure_is_retryable_and_a_retry_succeeds(node, inputs):
    adapter = ScriptedAdapter().fail_next(1)
    error = failing(node, inputs, adapter)
    assert isinstance(error, LLMError) and error.retryable
    assert run_stage(node, inputs, adapter).output   # the retry gets an answer
    assert len(adapter.calls) == 2


def test_non_retryable_backend_errors_pass_through():
    adapter = ScriptedAdapter().fail_next(1, ModelNotFoundError("model 'x' not found"))
    error = failing("generator", {"prompt": "p"}, adapter)
    assert isinstance(error, ModelNotFoundError) and not error.retryable


def test_a_socket_error_becomes_a_retryable_llm_error():
    adapter = ScriptedAdapter(rules=[(r".", ConnectionRefusedError(111, "refused"))])
    error = failing("generator", {"prompt": "p"}, adapter)
    assert isinstance(error, LLMError) and error.retryable
    assert "ConnectionRefusedError" in str(error)


@pytest.mark.parametrize("node, inputs", [
    ("generator", {"prompt": "p"}),
    ("critic", {"content": "c"}),
    ("improver", {"content": "c", "feedback": "f"}),
    ("combiner", {"inputs": ["a", "b"]}),
    ("chat", {"message": "hi"}),
    ("translator", {"text": "t", "target_language": "fr"}),
])
def test_an_empty_reply_is_a_retryable_error_not_a_success(node, inputs):
    adapter = ScriptedAdapter().empty_next(1)
    services_error = failing(node, inputs, adapter)
    assert isinstance(services_error, LLMError) and services_error.retryable
    assert "empty reply" in str(services_error) and "scripted-model" in str(services_error)


def test_whitespace_only_reply_counts_as_empty_and_usage_is_still_recorded():
    adapter = ScriptedAdapter(rules=[(r".", "  \n ")])
    services = Services(adapter)
    stage = parse_pipeline({"name": "t", "stages": [
        {"id": "g", "type": "generator", "input_mapping": {"prompt": "p"}}]}).stages[0]
    ctx = StageContext(stage, _field_values(get_component("generator"), stage.inputs),
                       None, {}, services)
    with pytest.raises(LLMError):
        asyncio.run(get_component("generator").run(ctx))
    assert services.usage == [("g", 1, 0, "scripted-model")]


# -- critic ---------------------------------------------------------------------------------

CRITIC_FIELDS = {"overall_rating", "score", "feedback", "strengths", "improvements",
                 "criterion_scores", "passes_threshold"}


def test_critic_parses_the_fenced_default_reply():
    outcome = run_stage("critic", {"content": "Draft text", "criteria": ["clarity", "tone"],
                                   "rubric": {"clarity": "easy to follow"}})
    out = outcome.output
    assert set(out) == CRITIC_FIELDS
    assert out["overall_rating"] == "good" and out["score"] == 0.8
    assert out["feedback"].startswith('Scripted feedback on "Draft text"')
    assert out["strengths"] == ["Clear structure"]
    assert out["criterion_scores"] == {"clarity": 0.8} and out["passes_threshold"] is True
    assert "- clarity: easy to follow\n- tone" in outcome.call.prompt
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.3, 2048)
    assert outcome.warnings == []


def test_critic_accepts_the_gallerys_prose_criteria_as_written():
    prose = "Evaluate the content for:\n1. Clarity, readability\n2. Tone"
    outcome = run_stage("critic", {"content": "c", "criteria": prose})
    assert prose in outcome.call.prompt


def test_critic_accepts_criteria_as_a_json_array_string():
    outcome = run_stage("critic", {"content": "c", "criteria": '["grammar", "tone"]'})
    assert "- grammar\n- tone" in outcome.call.prompt


def test_critic_refuses_criteria_of_another_shape():
    error = failing("critic", {"content": "c", "criteria": {"a": 1}})
    assert isinstance(error, MappingError) and "'criteria'" in str(error)


def test_critic_reads_json_inside_prose_with_comments_and_trailing_commas():
    reply = ('Here is my evaluation:\n{"overall_rating": "Needs Improvement", // my view\n'
             ' "score": "6/10", "feedback": "Too long.", "improvements": "Cut it",}\nThanks!')
    out = run_stage("critic", {"content": "c"}, ScriptedAdapter([(r".", reply)])).output
    assert out["overall_rating"] == "needs_improvement"
    assert out["score"] == pytest.approx(0.6)
    assert out["feedback"] == "Too long." and out["improvements"] == ["Cut it"]


def test_critic_rescales_scores_and_derives_an_unknown_rating_from_the_score():
    reply = json.dumps({"overall_rating": "B+", "score": 85, "feedback": "ok",
                        "criterion_scores": {"clarity": 9, "tone": "n/a"},
                        "passes_threshold": "no"})
    out = run_stage("critic", {"content": "c"}, ScriptedAdapter([(r".", reply)])).output
    assert out["score"] == pytest.approx(0.85) and out["overall_rating"] == "good"
    assert out["criterion_scores"] == {"clarity": pytest.approx(0.9)}
    assert out["passes_threshold"] is False


def test_critic_without_feedback_key_uses_the_improvements():
    reply = json.dumps({"score": 0.4, "improvements": ["Shorter intro", "Fix typos"]})
    out = run_stage("critic", {"content": "c"}, ScriptedAdapter([(r".", reply)])).output
    assert out["feedback"] == "Shorter intro\nFix typos"
    assert out["overall_rating"] == "acceptable"    # the reference's default rating


def test_critic_falls_back_like_the_reference_when_the_reply_is_not_json():
    reply = "The text is decent but the {tone} is off."
    outcome = run_stage("critic", {"content": "c"}, ScriptedAdapter([(r".", reply)]))
    assert outcome.output == {
        "overall_rating": "acceptable", "score": 0.5, "feedback": reply, "strengths": [],
        "improvements": [], "criterion_scores": {}, "passes_threshold": True}
    assert len(outcome.warnings) == 1


# -- improver -------------------------------------------------------------------------------

def test_improver_parses_the_default_reply_and_adds_the_gallerys_aliases():
    outcome = run_stage("improver", {
        "content": "First draft", "feedback": "Add an example",
        "improvements": ["example"], "preserve_aspects": ["tone"],
        "improvement_focus": "clarity", "instructions": "Keep it under 50 words"})
    out = outcome.output
    assert out["improved_content"] == "Improved: First draft"
    assert out["content"] == out["improved"] == out["improved_content"]
    assert out["changes_made"] == ["Added a concrete example"]
    assert out["preserved_aspects"] == ["tone"]
    assert out["improvement_summary"] == "Applied the feedback."
    prompt = outcome.call.prompt
    for text in ("First draft", "Add an example", "- example", "- tone", "clarity",
                 "Instructions:\nKeep it under 50 words"):
        assert text in prompt
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.5, 4096)


def test_improver_non_json_reply_is_the_improved_content():
    reply = "Here is a better draft with an example."
    out = run_stage("improver", {"content": "c", "feedback": "f", "preserve_aspects": ["x"]},
                    ScriptedAdapter([(r".", reply)])).output
    assert out["improved_content"] == reply and out["changes_made"] == ["Applied feedback"]
    assert out["preserved_aspects"] == ["x"]
    assert out["improvement_summary"] == "Content improved based on feedback"


def test_improver_reply_that_is_other_json_is_taken_whole():
    # data-extractor asks for "ONLY the JSON object": the data itself, not our wrapper.
    reply = '{"name": "ACME", "total": 12}'
    out = run_stage("improver", {"content": "c", "feedback": "f"},
                    ScriptedAdapter([(r".", reply)])).output
    assert out["improved_content"] == reply


def test_improver_checks_max_iterations_bounds():
    error = failing("improver", {"content": "c", "feedback": "f", "max_iterations": 9})
    assert isinstance(error, MappingError) and "max_iterations" in str(error)


# -- selector -------------------------------------------------------------------------------

def test_selector_with_the_gallerys_labelled_options():
    outcome = run_stage("selector", {
        "options": [{"label": "Creative", "content": "A"}, {"label": "Precise", "content": "B"}],
        "criteria": "Pick the clearest."})
    out = outcome.output
    assert out["selected"] == "A" and out["selected_index"] == 0
    assert out["selected_label"] == "Creative"
    assert out["explanation"] == out["reasoning"] == "Option 0 is the clearest and most complete."
    assert out["rankings"] == [{"index": 0, "score": 0.9}] and out["confidence"] == 0.85
    assert "[Option 0: Creative]:\nA" in outcome.call.prompt
    assert "[Option 1: Precise]:\nB" in outcome.call.prompt
    assert "Pick the clearest." in outcome.call.prompt
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.2, 2048)


def test_selector_reads_a_string_index_from_a_fenced_reply():
    reply = '```json\n{"selected_index": "2", "explanation": "C wins", "confidence": "90%"}\n```'
    out = run_stage("selector", {"candidates": ["A", "B", "C"]},
                    ScriptedAdapter([(r".", reply)])).output
    assert (out["selected"], out["selected_index"], out["confidence"]) == ("C", 2, 0.9)
    assert "selected_label" not in out


@pytest.mark.parametrize("index", [7, -1, None, "first"])
def test_selector_out_of_range_or_missing_index_selects_the_first(index):
    reply = json.dumps({"selected_index": index, "explanation": "e"})
    out = run_stage("selector", {"candidates": ["A", "B"]},
                    ScriptedAdapter([(r".", reply)])).output
    assert (out["selected"], out["selected_index"]) == ("A", 0)


def test_selector_non_json_reply_falls_back_to_the_first_candidate():
    out = run_stage("selector", {"candidates": ["A", "B"]},
                    ScriptedAdapter([(r".", "I like the second one.")])).output
    assert out == {"selected": "A", "selected_index": 0, "explanation": "I like the second one.",
                   "rankings": [], "confidence": 0.5, "reasoning": "I like the second one."}


@pytest.mark.parametrize("inputs, needle", [
    ({"candidates": ["only one"]}, "at least 2"),
    ({}, "'candidates'"),
    ({"options": [{"label": "x"}, "b"]}, "options[0]"),
    ({"candidates": ["a", "b"], "top_n": 11}, "top_n"),
])
def test_selector_refuses_unusable_candidates(inputs, needle):
    error = failing("selector", inputs)
    assert isinstance(error, MappingError) and needle in str(error)


def test_selector_mode_changes_the_instruction():
    outcome = run_stage("selector", {"candidates": ["a", "b"], "selection_mode": "top_n",
                                     "top_n": 2})
    assert "top 2 options" in outcome.call.system


# -- combiner -------------------------------------------------------------------------------

COMBINER_FIELDS = {"synthesized", "sources_used", "strategy_applied", "key_themes"}


def test_combiner_parses_an_unlabelled_fence():
    outcome = run_stage("combiner", {"inputs": ["one", "two", "three"],
                                     "synthesis_strategy": "best_of", "context": "ctx",
                                     "output_format": "structured", "max_length": 200,
                                     "preserve_sources": True})
    out = outcome.output
    assert set(out) == COMBINER_FIELDS
    assert out["synthesized"].startswith("Scripted synthesis")
    assert out["sources_used"] == 3 and out["strategy_applied"] == "best_of"
    assert out["key_themes"] == ["quality", "clarity"]
    prompt = outcome.call.prompt
    for text in ("[Source 1]:\none", "[Source 3]:\nthree", "Context: ctx",
                 "Output format: structured", "about 200 words", "According to Source 1"):
        assert text in prompt
    assert "Best of" in outcome.call.system
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.5, 4096)


def test_combiner_accepts_the_gallerys_sources_and_instructions():
    outcome = run_stage("synthesizer", {
        "sources": [{"label": "Deal", "content": "D"}, {"label": "Intel", "content": "I"}],
        "instructions": "Write an executive summary."})
    assert outcome.output["sources_used"] == 2
    assert "[Source 1: Deal]:\nD" in outcome.call.prompt
    assert "Instructions:\nWrite an executive summary." in outcome.call.prompt


def test_combiner_unknown_strategy_uses_integrate_instructions():
    outcome = run_stage("combiner", {"inputs": ["a", "b"], "synthesis_strategy": "mash"})
    assert "Integrate" in outcome.call.system
    assert outcome.output["strategy_applied"] == "mash"


def test_combiner_non_json_reply_is_the_synthesis():
    out = run_stage("combiner", {"inputs": ["a", "b"]},
                    ScriptedAdapter([(r".", "A and B agree.")])).output
    assert out == {"synthesized": "A and B agree.", "sources_used": 2,
                   "strategy_applied": "integrate", "key_themes": []}


@pytest.mark.parametrize("inputs, needle", [
    ({"inputs": ["a"]}, "at least 2"),
    ({}, "'inputs'"),
    ({"inputs": ["a", "b"], "max_length": 5}, "max_length"),
])
def test_combiner_refuses_unusable_inputs(inputs, needle):
    error = failing("combiner", inputs)
    assert isinstance(error, MappingError) and needle in str(error)


# -- analyzer, chat, rewriter, summarizer, translator -----------------------------------------

def test_analyzer_parses_json_and_keeps_the_raw_reply():
    outcome = run_stage("analyzer", {"text": "I love it"})
    out = outcome.output
    assert set(out) == {"analysis", "type", "input", "raw"}
    assert out["analysis"]["sentiment"] == "positive" and out["type"] == "sentiment"
    assert out["input"] == "I love it" and json.loads(out["raw"]) == out["analysis"]
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.3, 2048)


def test_analyzer_custom_prompt_and_text_reply():
    outcome = run_stage("analyzer", {"text": "t", "analysis_type": "tone",
                                     "prompt": "Describe the tone."},
                        ScriptedAdapter([(r".", "  Friendly.  ")]))
    assert outcome.output["analysis"] == "Friendly." == outcome.output["raw"]
    assert outcome.call.prompt == "Describe the tone.\n\nText: t"


def test_chat_trims_history_and_counts_turns():
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "m%d" % i}
               for i in range(6)]
    outcome = run_stage("chat", {"message": "next?", "history": history, "max_history": 1,
                                 "persona": "a pirate"}, ScriptedAdapter([(r".", " Arr. ")]))
    out = outcome.output
    assert out["response"] == "Arr."
    assert [turn["content"] for turn in out["history"]] == ["m4", "m5", "next?", "Arr."]
    assert out["turn_count"] == 2
    assert outcome.call.prompt == "User: m4\n\nAssistant: m5\n\nUser: next?\n\nAssistant:"
    assert outcome.call.system.endswith("Persona: a pirate")
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.7, 2048)


def test_chat_refuses_a_history_turn_that_is_not_an_object():
    error = failing("chat", {"message": "m", "history": ["hello"]})
    assert isinstance(error, MappingError) and "history[0]" in str(error)


def test_rewriter_outputs():
    outcome = run_stage("rewriter", {"text": "hi there", "style": "formal", "tone": "warm",
                                     "target_audience": "bankers"},
                        ScriptedAdapter([(r".", " Good day. ")]))
    assert outcome.output == {"rewritten": "Good day.", "style": "formal", "tone": "warm",
                              "input": "hi there"}
    assert "formal" in outcome.call.prompt and "bankers" in outcome.call.prompt
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.7, 4096)


def test_summarizer_outputs_and_word_count():
    outcome = run_stage("summarizer", {"text": "long text", "style": "bullet",
                                       "max_length": 50, "focus": "costs"},
                        ScriptedAdapter([(r".", "- one\n- two three")]))
    assert outcome.output == {"summary": "- one\n- two three", "style": "bullet",
                              "input": "long text", "word_count": 5}
    assert "under 50 words" in outcome.call.prompt and "costs" in outcome.call.prompt
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.3, 2048)


@pytest.mark.parametrize("source, shown", [(None, "auto-detected"), ("German", "German")])
def test_translator_outputs(source, shown):
    inputs = {"text": "Hallo", "target_language": "English"}
    if source:
        inputs["source_language"] = source
    outcome = run_stage("translator", inputs, ScriptedAdapter([(r".", "Hello")]))
    assert outcome.output == {"translated": "Hello", "source_language": shown,
                              "target_language": "English", "input": "Hallo"}
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.3, 4096)


# -- embedder -------------------------------------------------------------------------------

def reference_embedding(text, dimensions):
    """The reference's formula, written as it is there (semantics §4.1)."""
    number = int(hashlib.md5(text.encode()).hexdigest(), 16)
    return [(((number >> (i * 8)) & 0xFF) / 128.0) - 1.0 for i in range(dimensions)]


def test_embedder_matches_the_reference_without_calling_the_llm():
    outcome = run_stage("embedder", {"text": "héllo", "normalize": False})
    assert outcome.output == {"embedding": reference_embedding("héllo", 8), "text": "héllo",
                              "dimensions": 8}
    assert outcome.adapter.calls == [] and outcome.services.usage == []


def test_embedder_normalizes_and_extends_past_sixteen_dimensions():
    vector = run_stage("embedder", {"text": "abc", "dimensions": 40}).output["embedding"]
    assert len(vector) == 40
    assert math.isclose(sum(v * v for v in vector), 1.0)
    raw = run_stage("embedder", {"text": "abc", "dimensions": 40,
                                 "normalize": False}).output["embedding"]
    assert raw[:16] == reference_embedding("abc", 16)
    assert raw[16:] != [-1.0] * 24      # the reference pads with -1.0 here
    assert raw == run_stage("embedder", {"text": "abc", "dimensions": 40,
                                         "normalize": False}).output["embedding"]


def test_embedder_bounds():
    error = failing("embedder", {"text": "t", "dimensions": 1})
    assert isinstance(error, MappingError) and "dimensions" in str(error)


# -- compliance_evaluator -------------------------------------------------------------------

COMPLIANCE_INPUTS = {
    "context_data": {"request_type": "refund", "amount": 150},
    "rule_violations": [{"rule_name": "max_refund", "severity": "high", "action": "block",
                         "message": "over 100"}],
    "relevant_policies": [{"title": "Refund policy", "category": "finance",
                           "content": "Refunds over 100 need approval."}],
    "evaluation_type": "strict", "allow_exceptions": False,
}


def test_compliance_evaluator_parses_the_line_format():
    reply = ("**DECISION:** Denied\nRisk level: HIGH\nCONFIDENCE: 0.85\n"
             "EXPLANATION: Amount over the limit.\nIt was also late.\n"
             "RECOMMENDED_ACTIONS:\n- Escalate to finance\n2. Tell the customer\n"
             "EXCEPTION_DETAILS: N/A\nESCALATION_REQUIRED: yes\nAUDIT_SUMMARY: Refund denied.")
    outcome = run_stage("compliance_evaluator", COMPLIANCE_INPUTS,
                        ScriptedAdapter([(r".", reply)]))
    assert outcome.output == {
        "decision": "denied", "risk_level": "high", "confidence": 0.85,
        "explanation": "Amount over the limit.\nIt was also late.",
        "recommended_actions": ["Escalate to finance", "Tell the customer"],
        "exception_details": None, "policies_applied": ["Refund policy"],
        "violations_considered": ["max_refund"], "escalation_required": True,
        "audit_summary": "Refund denied."}
    prompt, system = outcome.call.prompt, outcome.call.system
    assert '"amount": 150' in prompt and "**max_refund** (high severity)" in prompt
    assert "Refunds over 100 need approval." in prompt and "NOT permitted" in prompt
    assert "STRICT MODE" in system
    assert (outcome.call.temperature, outcome.call.max_tokens) == (0.2, 4096)


def test_compliance_evaluator_default_reply_and_json_reply():
    assert run_stage("compliance_evaluator", {"context_data": {"a": 1}}).output["decision"] \
        == "approved"
    reply = 'Result: {"decision": "exception recommended", "risk_level": "medium", ' \
            '"recommended_actions": ["Offer credit"], "exception_details": "Loyal customer"}'
    out = run_stage("compliance_evaluator", {"context_data": {"a": 1}},
                    ScriptedAdapter([(r".", reply)])).output
    assert out["decision"] == "exception_recommended" and out["risk_level"] == "medium"
    assert out["recommended_actions"] == ["Offer credit"]
    assert out["exception_details"] == {"reasoning": "Loyal customer"}


def test_compliance_evaluator_unstructured_reply_requires_review():
    reply = "I cannot decide this one."
    outcome = run_stage("compliance_evaluator", {"context_data": {"a": 1}},
                        ScriptedAdapter([(r".", reply)]))
    out = outcome.output
    assert (out["decision"], out["risk_level"], out["confidence"]) == \
        ("requires_review", "medium", 0.5)
    assert out["explanation"] == reply
    assert out["audit_summary"] == "Compliance evaluation: requires_review"
    assert len(outcome.warnings) == 1


# -- The lenient JSON reader ----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('```JSON\r\n{"a": 1}\n```\nDone.', {"a": 1}),
    ('Sure! Here it is: {"a": {"b": [1, 2]}} Hope this helps {x}.', {"a": {"b": [1, 2]}}),
    ('The set {1, 2} is small. {"a": "curly } inside"}', {"a": "curly } inside"}),
    ('{"a": "line one\nline two"}', {"a": "line one\nline two"}),
    ('{"a": 1, // note\n "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
    ('{"url": "http://x//y", "a": 1,}', {"url": "http://x//y", "a": 1}),
    ("No JSON here.", None),
    ('{"unterminated": ', None),
    ("", None),
])
def test_extract_object(text, expected):
    assert extract_object(text) == expected


def test_extract_object_prefers_an_object_with_the_expected_keys():
    text = 'Example: {"foo": 1}. Answer: {"score": 0.5}'
    assert extract_object(text, ("score",)) == {"score": 0.5}
    assert extract_object('{"foo": 1}', ("score",)) is None


def test_extract_object_prefers_the_fenced_block():
    text = 'I considered {"score": 0.1} first.\n```json\n{"score": 0.9}\n```'
    assert extract_object(text, ("score",)) == {"score": 0.9}


def test_extract_array_and_pathological_input_stays_bounded():
    assert extract_array("Vector: [0.5, -0.25] ok") == [0.5, -0.25]
    assert extract_object("{" * 50000) is None
    assert extract_array("[" * 50000) is None


@pytest.mark.parametrize("value, expected", [
    (0.7, 0.7), (7, 0.7), (70, 0.7), ("7/10", 0.7), ("70%", 0.7), ("0.7", 0.7),
    ("about 8 out of 10", 0.8), (250, 1.0), (-3, 0.0), ("n/a", None), (True, None),
    (float("nan"), None),
])
def test_as_fraction(value, expected):
    result = as_fraction(value, None)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_small_converters():
    assert as_text_list("one") == ["one"] and as_text_list([" a ", "", None, 3]) == ["a", "3"]
    assert as_bool("PASS", None) is True and as_bool("nope", None) is None


# -- The ScriptedAdapter itself -------------------------------------------------------------

def test_scripted_rules_in_order_sequences_and_callables():
    adapter = ScriptedAdapter(rules=[
        (r"count", ["one", "two"]),
        (r"echo (\w+)", lambda prompt, system: re.search(r"echo (\w+)", prompt).group(1)),
        (r".", "fallback"),
    ])

    async def scenario():
        replies = []
        for prompt in ("count", "count", "count", "echo hi", "zzz"):
            replies.append((await adapter.generate(prompt, temperature=0.1, max_tokens=5,
                                                   seed=3, model="m")).text)
        return replies

    assert asyncio.run(scenario()) == ["one", "two", "two", "hi", "fallback"]
    assert [(c.method, c.temperature, c.max_tokens, c.seed, c.model)
            for c in adapter.calls][0] == ("generate", 0.1, 5, 3, "m")
    assert len(adapter.calls) == 5


def test_scripted_failures_then_empty_then_answers():
    adapter = ScriptedAdapter().fail_next(2).empty_next(1)

    async def scenario():
        outcomes = []
        for _ in range(4):
            try:
                outcomes.append((await adapter.generate("p")).text)
            except LLMError as error:
                outcomes.append(type(error).__name__)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[:3] == ["LLMError", "LLMError", ""]
    assert outcomes[3] == default_reply("p") and len(adapter.calls) == 4


def test_scripted_delay_is_cancellable_like_a_slow_model():
    adapter = ScriptedAdapter(delay_s=3600)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(adapter.generate("p"), 0.01)

    asyncio.run(scenario())
    assert len(adapter.calls) == 1


def test_scripted_slow_next_delays_only_the_next_calls():
    adapter = ScriptedAdapter().slow_next(1)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(adapter.generate("p"), 0.01)
        return (await asyncio.wait_for(adapter.generate("p"), 60)).text

    assert asyncio.run(scenario()) == default_reply("p")


def test_scripted_chat_stream_health_and_close():
    adapter = ScriptedAdapter(rules=[(r"user: hi", "hello there friend")])

    async def scenario():
        chat = await adapter.chat([{"role": "system", "content": "S"},
                                   {"role": "user", "content": "hi"}])
        pieces = [piece async for piece in adapter.stream("user: hi")]
        healthy = await adapter.health()
        await adapter.close()
        return chat, pieces, healthy, await adapter.health(), await adapter.list_models()

    chat, pieces, healthy, after_close, models = asyncio.run(scenario())
    assert chat.text == "hello there friend" and adapter.calls[0].system == "S"
    assert len(pieces) == 3 and "".join(pieces) == "hello there friend"
    assert (healthy, after_close, models) == (True, False, ["scripted-model"])


def test_default_generator_replies_depend_only_on_the_prompt():
    first, second = ScriptedAdapter(), ScriptedAdapter()
    assert first.reply_for("Write about cats") == second.reply_for("Write about cats")
    assert first.reply_for("Write about cats") != first.reply_for("Write about dogs")


# -- Every LLM stage of the gallery's offline templates works with the default replies ------

_TEMPLATE = re.compile(r"\{\{.*?\}\}", re.S)


def _placeholders(value):
    """Templates replaced by text, as the executor would hand the stage resolved values."""
    if isinstance(value, str):
        return _TEMPLATE.sub("resolved text", value)
    if isinstance(value, list):
        return [_placeholders(item) for item in value]
    if isinstance(value, dict):
        return {key: _placeholders(item) for key, item in value.items()}
    return value


def gallery_llm_stages():
    for name, doc in sorted(require_gallery().items()):
        if name in NEEDS_EXTERNAL_SERVICE:
            continue
        for stage in parse_pipeline(doc).stages:
            if catalog.needs_llm(stage.type):
                yield name, stage


def test_default_replies_satisfy_every_gallery_llm_stage():
    seen = set()
    for name, stage in gallery_llm_stages():
        inputs = _placeholders(stage.inputs)
        outcome = run_stage(stage.declared_type, inputs,
                            llm_settings=stage.llm_settings or {})
        label = "{} / {}".format(name, stage.id)
        assert outcome.warnings == [], label          # no reference fallback was needed
        assert all(value not in ("", None) for key, value in outcome.output.items()
                   if key in ("content", "feedback", "improved_content", "selected",
                              "synthesized")), label
        seen.add(stage.type)
    assert seen == {"generator", "critic", "improver", "selector", "combiner"}
