"""ScriptedAdapter: a deterministic LocalLLMAdapter for tests (no model, no network).

    adapter = ScriptedAdapter(rules=[(r"capital of France", "Paris")])
    adapter.fail_next(2)            # the next 2 calls raise LLMError (retryable)
    adapter.empty_next(1)           # then one call answers ""
    adapter.delay_s = 5             # every call sleeps first: a slow model, for timeouts
    adapter.slow_next(1, 60)        # only the next call sleeps 60 s (timeout, then a retry)
    ... run stages ...
    adapter.calls[-1].temperature   # every call is recorded, failed ones included

How a reply is chosen, for each call:
1. a queued failure or empty reply (``fail_next``/``empty_next``), oldest first;
2. the first rule whose regex matches the prompt (``re.search``). A rule's reply is a
   string, a ``callable(prompt, system) -> str``, an exception instance (raised), or a list
   of those (one per matching call, the last one repeating);
3. the default reply for the LLM node that wrote the prompt, recognised by the output keys
   its system prompt asks for. Defaults are valid for every LLM node the gallery uses,
   and deliberately come in the shapes local models produce:
     critic      ```json fenced object (overall_rating "good", score 0.8, feedback ...)
     improver    a bare JSON object ("improved_content": "Improved: <first line>")
     selector    a sentence, then the JSON object (selected_index 0)
     combiner    a fence without a language tag around the object ("synthesized" ...)
     compliance  "KEY: value" lines (approved, low risk)
     analyzer    a JSON object with sentiment, intent, topics and entities keys
     otherwise   "Scripted reply [<8 hex of sha256(prompt)>]: <first line of the prompt>"
   The generator text depends only on the prompt, never on call order, so concurrent
   stages get the same replies in every run.

Token counts are whitespace-separated words (prompt + system, reply).
"""

import asyncio
import hashlib
import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from fmedge.adapters.base import GenerationResult, LocalLLMAdapter
from fmedge.errors import LLMError

EXCERPT_CHARS = 80
_EMPTY = object()


@dataclass
class Call:
    """One request the adapter received, as it received it."""

    method: str                 # generate, chat or stream
    prompt: str
    system: Optional[str]
    temperature: float
    max_tokens: int
    model: Optional[str]
    stop: Optional[List[str]]
    seed: Optional[int]
    json: bool


class ScriptedAdapter(LocalLLMAdapter):
    backend = "scripted"

    def __init__(self, rules=(), model="scripted-model", delay_s=0.0):
        super().__init__(model)
        self.rules = []
        for pattern, reply in rules:
            self.add_rule(pattern, reply)
        self.delay_s = delay_s
        self.calls: List[Call] = []
        self.closed = False
        self._queued = deque()          # exceptions to raise or _EMPTY, oldest first
        self._delays = deque()          # seconds for the next calls, before delay_s applies
        self._rule_uses: Dict[int, int] = {}

    # -- scripting ----------------------------------------------------------------------

    def add_rule(self, pattern, reply):
        """Answer prompts matching ``pattern`` with ``reply`` (see the module docstring)."""
        self.rules.append((re.compile(pattern) if isinstance(pattern, str) else pattern, reply))
        return self

    def fail_next(self, times=1, error=None):
        """Make the next ``times`` calls raise ``error`` (default: a retryable LLMError)."""
        for index in range(times):
            self._queued.append(error or LLMError(
                "scripted backend failure {} of {} (model {!r})".format(index + 1, times,
                                                                       self.model)))
        return self

    def empty_next(self, times=1):
        """Make the next ``times`` calls answer an empty text (a silent backend failure)."""
        self._queued.extend([_EMPTY] * times)
        return self

    def slow_next(self, times=1, seconds=3600.0):
        """Make the next ``times`` calls sleep ``seconds`` (instead of ``delay_s``) first."""
        self._delays.extend([seconds] * times)
        return self

    def reply_for(self, prompt, system=None):
        """The text a call with this prompt would get from the rules or the defaults."""
        for number, (pattern, reply) in enumerate(self.rules):
            if pattern.search(prompt):
                return self._rule_reply(number, reply, prompt, system)
        return default_reply(prompt, system)

    def _rule_reply(self, number, reply, prompt, system):
        if isinstance(reply, list):
            used = self._rule_uses.get(number, 0)
            self._rule_uses[number] = used + 1
            reply = reply[min(used, len(reply) - 1)]
        if isinstance(reply, BaseException):
            raise reply
        return reply(prompt, system) if callable(reply) else reply

    # -- the adapter interface ----------------------------------------------------------

    async def generate(self, prompt, system=None, temperature=0.7, max_tokens=512, stop=None,
                       seed=None, json=False, model=None) -> GenerationResult:
        self._record("generate", prompt, system, temperature, max_tokens, model, stop, seed,
                     json)
        text = await self._answer(prompt, system)
        return self._result(prompt, system, text, model)

    async def chat(self, messages, temperature=0.7, max_tokens=512, stop=None, seed=None,
                   json=False, model=None) -> GenerationResult:
        system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
        prompt = "\n\n".join("{}: {}".format(m.get("role"), m.get("content"))
                             for m in messages if m.get("role") != "system")
        self._record("chat", prompt, system, temperature, max_tokens, model, stop, seed, json)
        text = await self._answer(prompt, system)
        return self._result(prompt, system, text, model)

    async def stream(self, prompt, system=None, temperature=0.7, max_tokens=512, stop=None,
                     seed=None, model=None):
        self._record("stream", prompt, system, temperature, max_tokens, model, stop, seed,
                     False)
        text = await self._answer(prompt, system)
        for piece in re.findall(r"\S+\s*|\s+", text):
            yield piece

    async def health(self) -> bool:
        return not self.closed

    async def list_models(self) -> List[str]:
        return [self.model]

    async def close(self) -> None:
        self.closed = True

    # -- internals ------------------------------------------------------------------------

    def _record(self, method, prompt, system, temperature, max_tokens, model, stop, seed,
                json_mode):
        self.calls.append(Call(method, prompt, system, temperature, max_tokens, model,
                               list(stop) if stop else stop, seed, json_mode))

    async def _answer(self, prompt, system):
        delay = self._delays.popleft() if self._delays else self.delay_s
        if delay:
            # Cancellable, like a real slow generation. A call cancelled here consumes no
            # queued failure: it never got an answer.
            await asyncio.sleep(delay)
        if self._queued:
            queued = self._queued.popleft()
            if queued is _EMPTY:
                return ""
            raise queued
        return self.reply_for(prompt, system)

    def _result(self, prompt, system, text, model):
        prompt_words = len(prompt.split()) + len((system or "").split())
        return GenerationResult(text=text, model=model or self.model, finish_reason="stop",
                                prompt_tokens=prompt_words, completion_tokens=len(text.split()),
                                duration_ms=0.0)


# -- Default replies, one per LLM node ------------------------------------------------------

def default_reply(prompt, system=None):
    """A valid reply for the LLM node whose prompt this is (see the module docstring)."""
    system = system or ""
    for marker, make in _DEFAULTS:
        if marker in system:
            return make(prompt)
    if "Return JSON with:" in prompt:
        return _analysis()
    return "Scripted reply [{}]: {}".format(_tag(prompt), _first_line(prompt))


def _tag(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _first_line(text):
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:EXCERPT_CHARS]


def _quoted_content(prompt):
    """The text between the first pair of ``---`` lines (critic and improver prompts)."""
    match = re.search(r"---\n(.*?)\n---", prompt, re.S)
    return _first_line(match.group(1)) if match else _first_line(prompt)


def _critique(prompt):
    reply: Dict[str, Any] = {
        "overall_rating": "good", "score": 0.8,
        "feedback": "Scripted feedback on \"{}\": clear and well structured; add one concrete "
                    "example.".format(_quoted_content(prompt)),
        "strengths": ["Clear structure"], "improvements": ["Add a concrete example"],
        "criterion_scores": {"clarity": 0.8}, "passes_threshold": True,
    }
    return "```json\n{}\n```".format(json.dumps(reply, indent=2))


def _improvement(prompt):
    return json.dumps({
        "improved_content": "Improved: {}".format(_quoted_content(prompt)),
        "changes_made": ["Added a concrete example"], "preserved_aspects": ["tone"],
        "improvement_summary": "Applied the feedback.",
    })


def _selection(prompt):
    return "After comparing the options, option 0 is the strongest.\n" + json.dumps({
        "selected_index": 0, "explanation": "Option 0 is the clearest and most complete.",
        "rankings": [{"index": 0, "score": 0.9}], "confidence": 0.85,
    })


def _synthesis(prompt):
    return "```\n{}\n```".format(json.dumps({
        "synthesized": "Scripted synthesis [{}] of the sources.".format(_tag(prompt)),
        "key_themes": ["quality", "clarity"], "strategy_applied": _strategy(prompt),
    }))


def _strategy(prompt):
    match = re.search(r"Apply the '([^']*)' strategy", prompt)
    return match.group(1) if match else "integrate"


def _compliance(prompt):
    return ("DECISION: approved\nRISK_LEVEL: low\nCONFIDENCE: 0.9\n"
            "EXPLANATION: No violation blocks this request.\n"
            "RECOMMENDED_ACTIONS:\n- Proceed\n- Keep the record\n"
            "EXCEPTION_DETAILS: none\nESCALATION_REQUIRED: false\n"
            "AUDIT_SUMMARY: Approved by the scripted evaluator.")


def _analysis():
    return json.dumps({
        "sentiment": "positive", "confidence": 0.9, "explanation": "Scripted analysis.",
        "intent": "question", "entities": [], "topics": ["general"],
        "primaryTopic": "general", "summary": "Scripted summary.",
    })


# Keys the node's system prompt asks for, which are its output field names.
_DEFAULTS = (
    ('"overall_rating"', _critique),
    ('"improved_content"', _improvement),
    ('"selected_index"', _selection),
    ('"synthesized"', _synthesis),
    ("DECISION:", _compliance),
)
