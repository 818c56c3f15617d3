"""The LLM nodes: generator, critic, improver, selector, combiner (= synthesizer), analyzer,
chat, rewriter, summarizer, translator, embedder and compliance_evaluator.

Input fields, output field names, prompts' intent, temperatures and token limits follow
the reference (flowmason-semantics §4.1, §4.2). Where the reference is broken for a local
model, fm-edge deliberately differs:

* Backend failures raise retryable errors, and so does an empty reply: the reference
  turns an outage into an empty "success" (§3.10, §6 item 19).
* JSON replies are parsed leniently (``llm_json``): code fences, prose around the
  object, ``//`` comments and trailing commas; scores on 0-10/0-100 scales are rescaled.
* The stage's ``model`` and ``llm_settings`` (temperature, max_tokens, seed, stop) are
  honoured: they override the node's defaults, while an input the stage sets explicitly
  (generator's ``temperature``/``max_tokens``) wins over both (§1.11 lists them ignored).
* Token usage of every node is recorded with ``ctx.add_usage`` (the reference only counts
  generator's total, §3.8).
* The gallery's shapes are accepted: critic/selector ``criteria`` as prose, selector
  ``options`` (strings or ``{label, content}``), combiner ``sources`` (``{label,
  content}``) + ``instructions``, improver ``instructions``. The field names the gallery
  reads but the reference never produced are added as aliases next to the reference's
  names: improver ``content``/``improved`` (= ``improved_content``), selector ``reasoning``
  (= ``explanation``).
* embedder never asks the LLM (the adapter interface has no embedding call, and asking a
  chat model for numbers is not an embedding): it is the reference's deterministic
  MD5 vector, extended past 16 dimensions with further digests instead of padding -1.0.

``knowledge_query`` is not here: it also needs a vector store (catalog ``lacks``).
"""

import hashlib
import json
import math
import re

from ...adapters.base import GenerationResult
from ...errors import FmEdgeError, LLMError
from . import component
from .base import Field, MappingError
from .llm_json import (as_bool, as_fraction, as_index, as_score_map, as_text, as_text_list,
                       extract_object)

MAX_TOKENS_LIMIT = 128000
EXCERPT_CHARS = 200          # how much of a reply a log line or an error shows


# -- Calling the model --------------------------------------------------------------------

async def _generate(ctx, prompt, system=None, temperature=0.7, max_tokens=2048,
                    explicit=(), stop=None) -> GenerationResult:
    """One generation with the stage's settings; usage recorded; never an empty reply.

    ``temperature``/``max_tokens`` are the node's values; the stage's ``llm_settings``
    override them unless the stage set that input itself (names in ``explicit``).
    """
    stage = ctx.stage
    settings = dict(temperature=_setting(stage, "temperature", temperature, explicit),
                    max_tokens=_setting(stage, "max_tokens", max_tokens, explicit),
                    stop=stop if stop else _stage_stop(stage), seed=_stage_seed(stage),
                    model=stage.model)
    adapter = ctx.llm(stage.model)
    try:
        result = await adapter.generate(prompt, system=system, **settings)
    except FmEdgeError:
        raise
    except OSError as exc:
        # Adapters wrap backend errors in LLMError; a socket error that slipped through is
        # still an outage, so it must stay retryable.
        raise LLMError("{}: the LLM backend failed ({}: {}); check that the backend is "
                       "running, then retry".format(stage.type, type(exc).__name__, exc)
                       ) from exc
    # Some servers leave the model out of the reply: name the one that was asked.
    model = result.model = result.model or stage.model or getattr(adapter, "model", "") or ""
    ctx.add_usage(result.prompt_tokens, result.completion_tokens, model)
    if not (result.text or "").strip():
        raise LLMError(
            "{}: model {!r} returned an empty reply (finish_reason {!r}); retrying may help, "
            "else raise the stage's llm_settings.max_tokens or use another model".format(
                stage.type, model, result.finish_reason))
    return result


def _setting(stage, name, node_value, explicit):
    stage_value = getattr(stage, name, None)
    if name in explicit or stage_value is None:
        return node_value
    return stage_value


def _stage_seed(stage):
    seed = stage.llm_settings.get("seed")
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return seed
    raise MappingError("{}: llm_settings.seed is {!r}; write a whole number such as 42, or "
                       "remove it".format(stage.type, seed))


def _stage_stop(stage):
    stop = stage.llm_settings.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and all(isinstance(item, str) and item for item in stop):
        return stop
    raise MappingError("{}: llm_settings.stop is {!r}; write a list of non-empty strings such "
                       "as [\"\\n\\n\"], or remove it".format(stage.type, stop))


def _explicit(ctx, *names):
    """The inputs among ``names`` that the stage sets itself (as written in the document)."""
    return tuple(name for name in names if name in ctx.stage.inputs)


def _bounded(ctx, name, low, high):
    """The input ``name`` checked against the reference's bounds (None passes through)."""
    value = ctx.inputs.get(name)
    if value is None or low <= value <= high:
        return value
    raise MappingError("{}: field {!r} is {!r}; set it to a value from {} to {}".format(
        ctx.stage.type, name, value, low, high))


def _fallback_note(ctx, reply, expected):
    ctx.log("warning", "reply had no JSON object with {}; used the reference's fallback"
            .format(expected), reply=reply[:EXCERPT_CHARS])


def _suffix(label, value):
    """``"\\n\\n<label>: <value>"`` when value is set, else ""."""
    return "\n\n{}: {}".format(label, value) if value else ""


def _section(title, body):
    """``"\\n\\n<title>:\\n<body>"`` when body is set, else ""."""
    return "\n\n{}:\n{}".format(title, body.rstrip("\n")) if body else ""


def _bullets(items):
    return "".join("- {}\n".format(item) for item in items)


def _criteria_text(ctx, criteria, rubric=None):
    """Criteria as prompt text: a list becomes bullets (with rubric notes); prose stays.

    The gallery writes criteria as a paragraph (every critic does); the reference refuses
    that, but its meaning is clear, so it is given to the model as written.
    """
    if criteria is None or criteria == "":
        return ""
    if isinstance(criteria, str):
        listed = _json_list(criteria)
        if listed is None:
            return criteria.strip()
        criteria = listed
    if not isinstance(criteria, list):
        raise MappingError("{}: field 'criteria' is a {}; write a list such as "
                           "[\"clarity\", \"accuracy\"] or a sentence describing them"
                           .format(ctx.stage.type, type(criteria).__name__))
    rubric = rubric if isinstance(rubric, dict) else {}
    lines = []
    for item in as_text_list(criteria):
        note = rubric.get(item)
        lines.append("{}: {}".format(item, note) if note else item)
    return _bullets(lines).rstrip("\n")


def _json_list(text):
    """The list a ``'["a", "b"]'`` string holds (the reference's coercion), else None."""
    if not text.strip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _labelled_texts(ctx, field_name, items):
    """``[(label or None, text)]`` from strings or ``{label, content}`` objects."""
    if not isinstance(items, list):
        raise MappingError("{}: field {!r} must be a list, got {!r}".format(
            ctx.stage.type, field_name, items))
    pairs = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            if "content" not in item:
                raise MappingError(
                    "{}: {}[{}] is an object without 'content'; write {{\"label\": ..., "
                    "\"content\": ...}} or a plain string".format(ctx.stage.type, field_name,
                                                                index))
            label = item.get("label")
            pairs.append((as_text(label) if label is not None else None,
                          as_text(item["content"])))
        else:
            pairs.append((None, as_text(item)))
    return pairs


def _at_least_two(ctx, field_name, pairs):
    if len(pairs) < 2:
        raise MappingError("{}: field {!r} has {} item(s); give at least 2 to choose from or "
                           "combine".format(ctx.stage.type, field_name, len(pairs)))
    return pairs


# -- generator ------------------------------------------------------------------------------

@component("generator", fields={
    "prompt": Field("str", required=True),
    "system_prompt": Field("str?"),
    "max_tokens": Field("int", default=4096),
    "temperature": Field("float", default=0.7),
    "stop_sequences": Field("list[str]?"),
    "output_format": Field("str?"),            # accepted, unused (as in the reference)
})
async def generator(ctx):
    inputs = ctx.inputs
    result = await _generate(
        ctx, inputs["prompt"], inputs.get("system_prompt"),
        temperature=_bounded(ctx, "temperature", 0.0, 2.0),
        max_tokens=_bounded(ctx, "max_tokens", 1, MAX_TOKENS_LIMIT),
        explicit=_explicit(ctx, "temperature", "max_tokens"),
        stop=inputs.get("stop_sequences"))
    return {
        "content": result.text,
        "tokens_used": result.total_tokens,
        "finish_reason": result.finish_reason or "stop",
        "model": result.model,
    }


# -- critic ---------------------------------------------------------------------------------

RATINGS = ("excellent", "good", "acceptable", "needs_improvement", "poor")
CRITIC_KEYS = ("overall_rating", "score", "feedback", "strengths", "improvements",
               "criterion_scores", "passes_threshold")
CRITIC_SYSTEM = """You are an expert content evaluator. Analyse the content you are given \
and return structured feedback.{strict}
Answer with one JSON object with exactly these keys:
{{
  "overall_rating": "excellent|good|acceptable|needs_improvement|poor",
  "score": 0.0 to 1.0,
  "feedback": "a detailed explanation",
  "strengths": ["..."],
  "improvements": ["..."],
  "criterion_scores": {{"criterion": 0.0 to 1.0}},
  "passes_threshold": true or false
}}"""


@component("critic", fields={
    "content": Field("str", required=True),
    "criteria": Field("any?"),                # list[str], a JSON array string or prose
    "context": Field("str?"),
    "rubric": Field("dict?"),
    "strict_mode": Field("bool", default=False),
})
async def critic(ctx):
    inputs = ctx.inputs
    criteria = _criteria_text(ctx, inputs.get("criteria"), inputs.get("rubric"))
    strict = "\nApply strict evaluation standards." if inputs.get("strict_mode") else ""
    prompt = "Evaluate this content:\n---\n{}\n---{}{}".format(
        inputs["content"], _section("Evaluate it against these criteria", criteria),
        _suffix("Context", inputs.get("context")))
    result = await _generate(ctx, prompt, CRITIC_SYSTEM.format(strict=strict),
                             temperature=0.3, max_tokens=2048)
    reply = extract_object(result.text, CRITIC_KEYS)
    if reply is None:
        _fallback_note(ctx, result.text, "the critic's keys")
        return _critique({}, feedback=result.text)
    return _critique(reply)


def _critique(reply, feedback=None):
    score = as_fraction(reply.get("score"), 0.5)
    improvements = as_text_list(reply.get("improvements"))
    if feedback is None:
        # An object without "feedback" would hand the improver an empty brief.
        feedback = as_text(reply.get("feedback")) or "\n".join(improvements)
    return {
        "overall_rating": _rating(reply.get("overall_rating"), score),
        "score": score,
        "feedback": feedback,
        "strengths": as_text_list(reply.get("strengths")),
        "improvements": improvements,
        "criterion_scores": as_score_map(reply.get("criterion_scores")),
        "passes_threshold": as_bool(reply.get("passes_threshold"), True),
    }


def _rating(value, score):
    """One of RATINGS: the model's word when it is one, else derived from the score."""
    word = re.sub(r"[\s-]+", "_", as_text(value).strip().lower())
    if word in RATINGS:
        return word
    if value is None:
        return "acceptable"     # the reference's default for a missing rating
    for floor, rating in ((0.9, "excellent"), (0.75, "good"), (0.6, "acceptable"),
                          (0.4, "needs_improvement")):
        if score >= floor:
            return rating
    return "poor"


# -- improver -------------------------------------------------------------------------------

IMPROVER_KEYS = ("improved_content",)
IMPROVER_SYSTEM = """You are an expert editor. Improve the content you are given according \
to the feedback, keeping its original intent and voice.
Answer with one JSON object:
{
  "improved_content": "the complete improved text",
  "changes_made": ["..."],
  "preserved_aspects": ["..."],
  "improvement_summary": "a short summary"
}"""


@component("improver", fields={
    "content": Field("str", required=True),
    "feedback": Field("str", required=True),
    "improvements": Field("list[str]?"),
    "preserve_aspects": Field("list[str]?"),
    "improvement_focus": Field("str?"),
    "max_iterations": Field("int", default=1),   # accepted, unused (as in the reference)
    "instructions": Field("str?"),               # the gallery's; the reference drops it
})
async def improver(ctx):
    inputs = ctx.inputs
    _bounded(ctx, "max_iterations", 1, 5)
    preserve = inputs.get("preserve_aspects") or []
    prompt = "Original content:\n---\n{}\n---\n\nFeedback:\n{}".format(
        inputs["content"], inputs["feedback"])
    if inputs.get("improvements"):
        prompt += _section("Specific improvements to make", _bullets(inputs["improvements"]))
    prompt += _section("Preserve these aspects", _bullets(preserve))
    prompt += _suffix("Primary focus", inputs.get("improvement_focus"))
    prompt += _section("Instructions", inputs.get("instructions"))
    prompt += "\n\nImprove the content based on this feedback."
    result = await _generate(ctx, prompt, IMPROVER_SYSTEM, temperature=0.5, max_tokens=4096)
    reply = extract_object(result.text, IMPROVER_KEYS)
    if reply is None:
        _fallback_note(ctx, result.text, "'improved_content'")
        return _improvement(result.text, ["Applied feedback"], preserve,
                            "Content improved based on feedback")
    return _improvement(as_text(reply.get("improved_content")) or result.text,
                        as_text_list(reply.get("changes_made")),
                        as_text_list(reply.get("preserved_aspects")),
                        as_text(reply.get("improvement_summary")))


def _improvement(text, changes, preserved, summary):
    return {
        "improved_content": text,
        "changes_made": changes,
        "preserved_aspects": list(preserved),
        "improvement_summary": summary,
        # Aliases: 5 gallery templates read `.content` or `.improved` from an improver.
        "content": text,
        "improved": text,
    }


# -- selector -------------------------------------------------------------------------------

SELECTOR_KEYS = ("selected_index", "explanation", "rankings", "confidence")
SELECTOR_MODES = {
    "best": "Select the single best option.",
    "top_n": "Select the top {top_n} options, ranked from best to worst.",
    "rank_all": "Rank all options from best to worst, with scores.",
}
SELECTOR_SYSTEM = """You are an expert evaluator choosing the best option(s) among \
candidates. {mode}
Answer with one JSON object:
{{
  "selected_index": the number of the best option (options are numbered from 0),
  "explanation": "why it was selected",
  "rankings": [{{"index": 0, "score": 0.0 to 1.0, "strengths": ["..."], \
"weaknesses": ["..."]}}],
  "confidence": 0.0 to 1.0
}}"""


@component("selector", fields={
    "candidates": Field("list?"),
    "options": Field("list?"),                   # the gallery's name (strings or {label, content})
    "criteria": Field("any?"),
    "context": Field("str?"),
    "selection_mode": Field("str", default="best"),
    "top_n": Field("int", default=1),
    "explain_choice": Field("bool", default=True),   # accepted, unused (as in the reference)
})
async def selector(ctx):
    inputs = ctx.inputs
    field_name = "candidates" if inputs.get("candidates") is not None else "options"
    if inputs.get(field_name) is None:
        raise MappingError("selector: no candidates; set 'candidates' (a list of texts) or "
                           "'options' (a list of texts or {label, content} objects)")
    pairs = _at_least_two(ctx, field_name, _labelled_texts(ctx, field_name, inputs[field_name]))
    top_n = _bounded(ctx, "top_n", 1, 10)
    mode = SELECTOR_MODES.get(inputs.get("selection_mode"), SELECTOR_MODES["best"])
    listing = "".join("\n[Option {}{}]:\n{}\n".format(index, ": " + label if label else "", text)
                      for index, (label, text) in enumerate(pairs))
    criteria = _criteria_text(ctx, inputs.get("criteria"))
    prompt = "Select the best of these {} options:\n{}{}{}\n\nEvaluate each option and " \
             "select the best one.".format(len(pairs), listing, _section("Criteria", criteria),
                                           _suffix("Context", inputs.get("context")))
    result = await _generate(ctx, prompt, SELECTOR_SYSTEM.format(mode=mode.format(top_n=top_n)),
                             temperature=0.2, max_tokens=2048)
    reply = extract_object(result.text, SELECTOR_KEYS)
    if reply is None:
        _fallback_note(ctx, result.text, "'selected_index'")
        return _selection(pairs, 0, result.text, [], 0.5)
    index = as_index(reply.get("selected_index"))
    if index is None or not 0 <= index < len(pairs):
        index = 0        # the reference's rule for a missing or out-of-range index
    rankings = reply.get("rankings")
    return _selection(pairs, index, as_text(reply.get("explanation")),
                      rankings if isinstance(rankings, list) else [],
                      as_fraction(reply.get("confidence"), 0.5))


def _selection(pairs, index, explanation, rankings, confidence):
    label, text = pairs[index]
    output = {
        "selected": text,
        "selected_index": index,
        "explanation": explanation,
        "rankings": rankings,
        "confidence": confidence,
        "reasoning": explanation,   # alias: content-factory reads `.reasoning`
    }
    if label is not None:
        output["selected_label"] = label
    return output


# -- combiner (synthesizer) -----------------------------------------------------------------

COMBINER_KEYS = ("synthesized",)
STRATEGIES = {
    "integrate": "Integrate: weave every input into one coherent text, removing repetition "
                 "while keeping each unique insight.",
    "summarize": "Summarize: a concise summary of the key points and common themes of all "
                 "inputs.",
    "compare": "Compare: show where the inputs agree and differ, giving a balanced view.",
    "consensus": "Consensus: identify what all inputs agree on; focus on common ground.",
    "best_of": "Best of: judge each input and combine the strongest elements of each.",
}
COMBINER_SYSTEM = """You are an expert at synthesizing information from several sources.
{strategy}
Answer with one JSON object:
{{
  "synthesized": "the synthesized text",
  "key_themes": ["..."],
  "strategy_applied": "{name}"
}}"""


@component("combiner", fields={
    "inputs": Field("list?"),
    "sources": Field("list?"),                   # the gallery's [{label, content}]
    "instructions": Field("str?"),               # the gallery's
    "synthesis_strategy": Field("str", default="integrate"),
    "context": Field("str?"),
    "output_format": Field("str?"),
    "preserve_sources": Field("bool", default=False),
    "max_length": Field("int?"),
})
async def combiner(ctx):
    inputs = ctx.inputs
    field_name = "inputs" if inputs.get("inputs") is not None else "sources"
    if inputs.get(field_name) is None:
        raise MappingError("combiner: nothing to combine; set 'inputs' (a list of texts) or "
                           "'sources' (a list of {label, content} objects)")
    pairs = _at_least_two(ctx, field_name, _labelled_texts(ctx, field_name, inputs[field_name]))
    max_length = _bounded(ctx, "max_length", 10, 10000)
    strategy = inputs.get("synthesis_strategy") or "integrate"
    result = await _generate(
        ctx, _combiner_prompt(pairs, inputs, strategy, max_length),
        COMBINER_SYSTEM.format(strategy=STRATEGIES.get(strategy, STRATEGIES["integrate"]),
                               name=strategy),
        temperature=0.5, max_tokens=4096)
    reply = extract_object(result.text, COMBINER_KEYS)
    if reply is None:
        _fallback_note(ctx, result.text, "'synthesized'")
        reply = {}
    return {
        "synthesized": as_text(reply.get("synthesized")) or result.text,
        "sources_used": len(pairs),
        "strategy_applied": as_text(reply.get("strategy_applied")) or strategy,
        "key_themes": as_text_list(reply.get("key_themes")),
    }


def _combiner_prompt(pairs, inputs, strategy, max_length):
    listing = "".join("\n[Source {}{}]:\n{}\n".format(number, ": " + label if label else "", text)
                      for number, (label, text) in enumerate(pairs, 1))
    prompt = "Synthesize the following {} inputs:\n{}".format(len(pairs), listing)
    prompt += _suffix("Context", inputs.get("context"))
    prompt += _suffix("Output format", inputs.get("output_format"))
    if max_length:
        prompt += "\n\nTarget length: about {} words.".format(max_length)
    if inputs.get("preserve_sources"):
        prompt += "\n\nAttribute information to its source (\"According to Source 1...\")."
    prompt += _section("Instructions", inputs.get("instructions"))
    return prompt + "\n\nApply the '{}' strategy to combine these inputs into one output." \
        .format(strategy)


# -- analyzer -------------------------------------------------------------------------------

ANALYSES = {
    "sentiment": ("You are a sentiment analysis expert.",
                  "Analyse the sentiment of the text below. Return JSON with: sentiment "
                  "(positive/negative/neutral), confidence (0-1) and explanation."),
    "intent": ("You are an intent detection expert.",
               "Identify the intent of the text below. Return JSON with: intent, confidence "
               "(0-1) and entities (the entities mentioned)."),
    "topics": ("You are a topic extraction expert.",
               "Extract the main topics of the text below. Return JSON with: topics (array of "
               "topic names), primaryTopic and summary."),
    "entities": ("You are a named entity recognition expert.",
                 "Extract the named entities of the text below. Return JSON with: entities "
                 "(array of {type, value, context})."),
}


@component("analyzer", fields={
    "text": Field("str", required=True),
    "analysis_type": Field("str", default="sentiment"),
    "prompt": Field("str?"),
    "options": Field("dict?"),                   # accepted, unused (as in the reference)
})
async def analyzer(ctx):
    inputs = ctx.inputs
    kind = inputs.get("analysis_type") or "sentiment"
    system, instruction = ANALYSES.get(kind, (
        "You are an expert analyst. Analyse the text according to the instructions.",
        inputs.get("prompt") or "Analyse the text below and give your insights."))
    result = await _generate(ctx, "{}\n\nText: {}".format(instruction, inputs["text"]), system,
                             temperature=0.3, max_tokens=2048)
    raw = result.text.strip()
    analysis = extract_object(raw)
    return {"analysis": raw if analysis is None else analysis, "type": kind,
            "input": inputs["text"], "raw": raw}


# -- chat -----------------------------------------------------------------------------------

CHAT_SYSTEM = "You are a helpful assistant engaged in a conversation."


@component("chat", fields={
    "message": Field("str", required=True),
    "history": Field("list?"),
    "system_prompt": Field("str?"),
    "persona": Field("str?"),
    "max_history": Field("int", default=10),
})
async def chat(ctx):
    inputs = ctx.inputs
    pairs_kept = _bounded(ctx, "max_history", 1, 100)
    history = _chat_history(ctx, inputs.get("history") or [])[-2 * pairs_kept:]
    system = (inputs.get("system_prompt") or CHAT_SYSTEM) + _suffix("Persona",
                                                                    inputs.get("persona"))
    turns = "".join("{}: {}\n\n".format("User" if turn["role"] == "user" else "Assistant",
                                        turn["content"])
                    for turn in history if turn["role"] in ("user", "assistant"))
    prompt = "{}User: {}\n\nAssistant:".format(turns, inputs["message"])
    result = await _generate(ctx, prompt, system, temperature=0.7, max_tokens=2048)
    response = result.text.strip()
    history = history + [{"role": "user", "content": inputs["message"]},
                         {"role": "assistant", "content": response}]
    return {"response": response, "history": history, "turn_count": len(history) // 2}


def _chat_history(ctx, history):
    turns = []
    for index, turn in enumerate(history):
        if not isinstance(turn, dict):
            raise MappingError("chat: history[{}] is {!r}; each turn must be {{\"role\": "
                               "\"user\"|\"assistant\", \"content\": \"...\"}}"
                               .format(index, turn))
        turns.append({"role": as_text(turn.get("role")), "content": as_text(turn.get("content"))})
    return turns


# -- rewriter, summarizer, translator -------------------------------------------------------

REWRITE_STYLES = {
    "simplify": "Simplify the text below: simpler words, shorter sentences.",
    "formal": "Rewrite the text below in a formal, professional style.",
    "casual": "Rewrite the text below in a casual, conversational style.",
    "concise": "Rewrite the text below more concisely, keeping all key information.",
    "expand": "Expand the text below with more detail and explanation.",
    "creative": "Rewrite the text below creatively, to make it more engaging.",
    "improve": "Improve the text below for clarity and readability.",
}


@component("rewriter", fields={
    "text": Field("str", required=True),
    "style": Field("str", default="improve"),
    "tone": Field("str?"),
    "target_audience": Field("str?"),
    "preserve_key_points": Field("bool", default=True),
})
async def rewriter(ctx):
    inputs = ctx.inputs
    style = inputs.get("style") or "improve"
    prompt = "{}\n\n{}".format(REWRITE_STYLES.get(style, REWRITE_STYLES["improve"]),
                               inputs["text"])
    if inputs.get("tone"):
        prompt += "\n\nUse a {} tone.".format(inputs["tone"])
    prompt += _suffix("Target audience", inputs.get("target_audience"))
    if inputs.get("preserve_key_points"):
        prompt += "\n\nKeep every key point of the original."
    prompt += "\n\nReturn only the rewritten text."
    result = await _generate(
        ctx, prompt, "You are an expert writer and editor. Rewrite text as instructed while "
        "keeping its core meaning.", temperature=0.7, max_tokens=4096)
    return {"rewritten": result.text.strip(), "style": style, "tone": inputs.get("tone"),
            "input": inputs["text"]}


SUMMARY_STYLES = {
    "brief": "Write a brief summary (1-2 sentences) of the text below.",
    "detailed": "Write a detailed summary of the text below, covering every key point.",
    "bullet": "Summarize the text below as bullet points.",
    "executive": "Write an executive summary of the text below, focused on key decisions "
                 "and action items.",
}


@component("summarizer", fields={
    "text": Field("str", required=True),
    "style": Field("str", default="brief"),
    "max_length": Field("int?"),
    "focus": Field("str?"),
})
async def summarizer(ctx):
    inputs = ctx.inputs
    style = inputs.get("style") or "brief"
    max_length = _bounded(ctx, "max_length", 10, 10000)
    prompt = "{}\n\n{}".format(SUMMARY_STYLES.get(style, "Summarize the text below."),
                               inputs["text"])
    prompt += _suffix("Focus particularly on", inputs.get("focus"))
    if max_length:
        prompt += "\n\nKeep the summary under {} words.".format(max_length)
    result = await _generate(ctx, prompt, "You are an expert summarizer. Write clear, accurate "
                             "summaries.", temperature=0.3, max_tokens=2048)
    summary = result.text.strip()
    return {"summary": summary, "style": style, "input": inputs["text"],
            "word_count": len(summary.split())}


@component("translator", fields={
    "text": Field("str", required=True),
    "source_language": Field("str?"),
    "target_language": Field("str", required=True),
    "preserve_formatting": Field("bool", default=True),
    "preserve_tone": Field("bool", default=True),
    "context": Field("str?"),
})
async def translator(ctx):
    inputs = ctx.inputs
    source, target = inputs.get("source_language"), inputs["target_language"]
    if source:
        prompt = "Translate the text below from {} to {}:".format(source, target)
    else:
        prompt = "Detect the language of the text below and translate it to {}:".format(target)
    prompt += "\n\n" + inputs["text"]
    if inputs.get("preserve_formatting"):
        prompt += "\n\nKeep the original formatting (paragraphs, bullet points, emphasis)."
    if inputs.get("preserve_tone"):
        prompt += "\n\nKeep the original tone, style and voice."
    prompt += _suffix("Context", inputs.get("context"))
    prompt += "\n\nReturn only the translation, without explanations."
    result = await _generate(ctx, prompt, "You are an expert translator. Translate accurately, "
                             "keeping meaning, tone and context.", temperature=0.3,
                             max_tokens=4096)
    return {"translated": result.text.strip(), "source_language": source or "auto-detected",
            "target_language": target, "input": inputs["text"]}


# -- embedder -------------------------------------------------------------------------------

@component("embedder", fields={
    "text": Field("str", required=True),
    "dimensions": Field("int", default=8),
    "normalize": Field("bool", default=True),
})
def embedder(ctx):
    """The reference's no-LLM embedding: deterministic, offline, from MD5 digests.

    Not a semantic embedding: equal texts get equal vectors, nothing more. The reference
    "with LLM" path (asking a chat model to invent numbers) is not used.
    """
    dimensions = _bounded(ctx, "dimensions", 2, 1536)
    vector = hash_embedding(ctx.inputs["text"], dimensions)
    if ctx.inputs.get("normalize"):
        vector = _unit(vector)
    return {"embedding": vector, "text": ctx.inputs["text"], "dimensions": dimensions}


def hash_embedding(text, dimensions):
    """Byte i of the 128-bit MD5 of ``text``, from the least significant end, as b/128 - 1.

    That is the reference exactly for up to 16 dimensions. Past 16 the reference pads with
    -1.0; here each further 16 come from the MD5 of the text plus a block number.
    """
    data = text.encode("utf-8", "surrogatepass")
    values = []
    block = 0
    while len(values) < dimensions:
        seed = data if block == 0 else data + b"\x00" + str(block).encode("ascii")
        digest = hashlib.md5(seed, usedforsecurity=False).digest()
        values.extend(byte / 128.0 - 1.0 for byte in reversed(digest))
        block += 1
    return values[:dimensions]


def _unit(vector):
    magnitude = math.sqrt(sum(value * value for value in vector))
    return vector if magnitude == 0 else [value / magnitude for value in vector]


# -- compliance_evaluator -------------------------------------------------------------------

DECISIONS = ("approved", "denied", "requires_review", "exception_recommended")
RISK_LEVELS = ("low", "medium", "high", "critical")
COMPLIANCE_SECTIONS = ("DECISION", "RISK_LEVEL", "CONFIDENCE", "EXPLANATION",
                       "RECOMMENDED_ACTIONS", "EXCEPTION_DETAILS", "ESCALATION_REQUIRED",
                       "AUDIT_SUMMARY")
# "**Risk level:** high", "## DECISION: denied", "- CONFIDENCE: 0.8" all start a section.
_SECTION_LINE = re.compile(r"^[\s>#*_-]*({})[\s*_]*:[\s*_]*(.*)$".format(
    "|".join(name.replace("_", "[ _]") for name in COMPLIANCE_SECTIONS)), re.I)
MAX_POLICY_CHARS = 2000
MAX_ACTIONS = 10
COMPLIANCE_SYSTEM = """You are a compliance evaluation expert. Analyse the data, the rule \
violations and the relevant policies; decide, with clear reasoning; assess the risk; \
recommend actions.
Answer in exactly this format, one section per line:
DECISION: approved|denied|requires_review|exception_recommended
RISK_LEVEL: low|medium|high|critical
CONFIDENCE: 0.0 to 1.0
EXPLANATION: detailed reasoning
RECOMMENDED_ACTIONS: a bullet list of actions
EXCEPTION_DETAILS: if you recommend an exception, why and under which conditions
ESCALATION_REQUIRED: true|false
AUDIT_SUMMARY: one sentence for the records
Be thorough but concise; stick to facts and policies.{mode}"""
COMPLIANCE_MODES = {
    "strict": "\nSTRICT MODE: apply rules and policies literally; recommend no exception "
              "that a policy does not explicitly allow.",
    "lenient": "\nLENIENT MODE: consider the spirit of the policies and mitigating factors; "
               "balance compliance with business needs and customer experience.",
}


@component("compliance_evaluator", fields={
    "context_data": Field("dict", required=True),
    "rule_violations": Field("list", default=list),
    "relevant_policies": Field("list", default=list),
    "evaluation_type": Field("str", default="standard"),
    "require_explanation": Field("bool", default=True),
    "allow_exceptions": Field("bool", default=True),
    "additional_context": Field("str?"),
})
async def compliance_evaluator(ctx):
    inputs = ctx.inputs
    violations = [item if isinstance(item, dict) else {"rule_name": as_text(item)}
                  for item in inputs.get("rule_violations") or []]
    policies = [item if isinstance(item, dict) else {"title": as_text(item)}
                for item in inputs.get("relevant_policies") or []]
    system = COMPLIANCE_SYSTEM.format(mode=COMPLIANCE_MODES.get(inputs.get("evaluation_type"),
                                                                ""))
    result = await _generate(ctx, _compliance_prompt(inputs, violations, policies), system,
                             temperature=0.2, max_tokens=4096)
    sections = _compliance_sections(result.text)
    if "DECISION" not in sections:
        _fallback_note(ctx, result.text, "a DECISION line")
    return _compliance_output(sections, result.text, violations, policies)


def _compliance_prompt(inputs, violations, policies):
    lines = ["## Request/data being evaluated", "```json",
             json.dumps(inputs["context_data"], indent=2, default=str, ensure_ascii=False),
             "```", ""]
    if violations:
        lines.append("## Rule violations detected")
        for item in violations:
            lines.append("- **{}** ({} severity)".format(item.get("rule_name", "Unknown rule"),
                                                         item.get("severity", "unknown")))
            lines.append("  - Action: {}".format(item.get("action", "unknown")))
            lines.append("  - Message: {}".format(item.get("message", "No message")))
            if item.get("matched_value"):
                lines.append("  - Matched: {}".format(as_text(item["matched_value"])))
    else:
        lines += ["## Rule violations", "No structured rule violations detected."]
    lines += ["", "## Relevant policies"]
    for item in policies:
        lines.append("### {}".format(item.get("title", "Untitled policy")))
        if item.get("category"):
            lines.append("*Category: {}*".format(item["category"]))
        content = as_text(item.get("content"))
        if content:
            lines.append(content if len(content) <= MAX_POLICY_CHARS
                         else content[:MAX_POLICY_CHARS] + "...")
    if not policies:
        lines.append("No specific policies found for this situation.")
    if inputs.get("additional_context"):
        lines += ["", "## Additional context", inputs["additional_context"]]
    lines += ["", "## Your task", "Evaluate this request for compliance. Consider:",
              "1. The rule violations and their severity",
              "2. How the policies apply to this situation",
              "3. Mitigating or aggravating factors",
              "4. Whether an exception might be appropriate"]
    if not inputs.get("allow_exceptions"):
        lines.append("\nNote: exceptions are NOT permitted for this evaluation.")
    return "\n".join(lines)


def _compliance_sections(reply):
    """``{SECTION: text}`` from "KEY: value" lines; a JSON object with the same keys also works."""
    sections, current = {}, None
    for line in reply.splitlines():
        match = _SECTION_LINE.match(line)
        if match:
            current = re.sub(r"[ ]", "_", match.group(1).upper())
            sections[current] = [match.group(2).strip()]
        elif current and line.strip():
            sections[current].append(line.rstrip())
    if "DECISION" not in sections:
        reply_object = extract_object(reply, ("decision",)) or {}
        sections.update({key.upper(): [as_text(value) if not isinstance(value, list)
                                       else "\n".join(as_text_list(value))]
                         for key, value in reply_object.items()
                         if key.upper() in COMPLIANCE_SECTIONS})
    return {key: "\n".join(value).strip() for key, value in sections.items()}


def _compliance_output(sections, reply, violations, policies):
    decision = _decision(sections.get("DECISION"))
    exception = sections.get("EXCEPTION_DETAILS", "")
    actions = [re.sub(r"^[\s\-•*\d.)]+", "", line).strip()
               for line in sections.get("RECOMMENDED_ACTIONS", "").splitlines()]
    return {
        "decision": decision,
        "risk_level": _risk(sections.get("RISK_LEVEL")),
        "confidence": as_fraction(sections.get("CONFIDENCE"), 0.5),
        "explanation": sections.get("EXPLANATION") or reply[:500],
        "recommended_actions": [action for action in actions if action][:MAX_ACTIONS],
        "exception_details": ({"reasoning": exception} if exception and exception.lower()
                              not in ("none", "n/a", "not applicable", "-") else None),
        "policies_applied": [as_text(item.get("title", item.get("id", "Unknown")))
                             for item in policies],
        "violations_considered": [as_text(item.get("rule_name", item.get("rule_id", "Unknown")))
                                  for item in violations],
        "escalation_required": as_bool(sections.get("ESCALATION_REQUIRED", "").split(" ")[0]
                                       .strip(".,;"), False),
        "audit_summary": sections.get("AUDIT_SUMMARY") or
        "Compliance evaluation: {}".format(decision),
    }


def _decision(text):
    """The reference's normalisation: keywords, first match wins; else requires_review."""
    word = (text or "").lower()
    for keys, decision in ((("approve", "allow"), "approved"),
                           (("denied", "deny", "reject", "block"), "denied"),
                           (("exception",), "exception_recommended")):
        if any(key in word for key in keys):
            return decision
    return "requires_review"


def _risk(text):
    word = (text or "medium").lower()   # the reference's default when the line is absent
    for keys, level in ((("critical",), "critical"), (("high",), "high"),
                        (("medium", "moderate"), "medium")):
        if any(key in word for key in keys):
            return level
    return "low"
