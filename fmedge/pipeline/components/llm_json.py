"""Reading structured answers out of a local model's reply, leniently.

The reference parses critic/improver/selector/combiner replies with a strict ``json.loads``
(semantics §3.10, §6 item 20): a reply wrapped in a Markdown fence or in a sentence of
prose silently takes the fallback branch. Local models do both all the time, so here a
reply is searched, in order:

1. inside each Markdown code fence (```json ... ``` or a bare ``` ... ```);
2. in the whole reply, from each ``{`` (or ``[``) onwards: the first balanced value that
   parses (and, for objects, carries one of the expected keys) wins.

A value that does not parse as is gets one repair attempt for the two slips small models
make most: ``// comments`` (the reference's own selector prompt shows one) and trailing
commas. Literal newlines inside strings are accepted (``strict=False``).

The ``as_*`` helpers turn the loosely typed fields of a parsed reply into the exact output
types the nodes promise (a score of ``"8/10"`` becomes 0.8, a lone string becomes a list).
"""

import json
import math
import re

# Literal control characters inside strings: models put raw newlines in long texts.
_DECODER = json.JSONDecoder(strict=False)
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+.-]*[ \t]*\r?\n(.*?)```", re.S)
# Work bounds for pathological replies ("[[[[[[...", "x{x{x{..."): start positions tried
# per reply, repairs attempted per reply, and how far a repair looks for the closing bracket.
MAX_STARTS = 64
MAX_REPAIRS = 8
MAX_REPAIR_CHARS = 65536
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_TRUE_WORDS = frozenset(("true", "yes", "y", "1", "pass", "passed", "on"))
_FALSE_WORDS = frozenset(("false", "no", "n", "0", "fail", "failed", "off"))


def extract_object(text, keys=()):
    """The first JSON object in ``text`` holding one of ``keys`` (any object if empty).

    Returns None when there is none: the caller then applies the reference's fallback.
    """
    def wanted(value):
        return isinstance(value, dict) and (not keys or any(key in value for key in keys))
    return _extract(text, "{", wanted)


def extract_array(text):
    """The first JSON array in ``text``, or None."""
    return _extract(text, "[", lambda value: isinstance(value, list))


def _extract(text, opener, wanted):
    if not isinstance(text, str):
        return None
    text = text.lstrip("\ufeff")
    for candidate in _candidates(text):
        value = _first_value(candidate, opener, wanted)
        if value is not None:
            return value
    return None


def _candidates(text):
    """Fenced blocks first (the model's own idea of where the answer is), then everything."""
    for match in _FENCE.finditer(text):
        yield match.group(1)
    yield text


def _first_value(text, opener, wanted):
    start = text.find(opener)
    repairs = [MAX_REPAIRS]
    for _ in range(MAX_STARTS):
        if start < 0:
            return None
        value = _decode_at(text, start, repairs)
        if wanted(value):
            return value
        start = text.find(opener, start + 1)
    return None


def _decode_at(text, start, repairs):
    try:
        return _DECODER.raw_decode(text, start)[0]
    except RecursionError:
        return None     # nested deeper than the interpreter allows: not an answer
    except ValueError:
        pass
    if repairs[0] <= 0:
        return None
    repairs[0] -= 1
    end = _balanced_end(text, start, min(len(text), start + MAX_REPAIR_CHARS))
    if end is None:
        return None
    try:
        return _DECODER.decode(_repaired(text[start:end]))
    except (ValueError, RecursionError):
        return None


def _balanced_end(text, start, limit):
    """Index just past the bracket closing the one at ``start`` (strings skipped), or None
    when it does not close before ``limit``."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, limit):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _repaired(snippet):
    """``snippet`` without ``//`` line comments and trailing commas (outside strings)."""
    out, index, in_string = [], 0, False
    while index < len(snippet):
        char = snippet[index]
        if in_string:
            out.append(char)
            if char == "\\" and index + 1 < len(snippet):
                out.append(snippet[index + 1])
                index += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(char)
        elif snippet.startswith("//", index):
            newline = snippet.find("\n", index)
            index = len(snippet) if newline < 0 else newline
            continue
        elif char in "}]":
            _drop_trailing_comma(out)
            out.append(char)
        else:
            out.append(char)
        index += 1
    return "".join(out)


def _drop_trailing_comma(out):
    position = len(out) - 1
    while position >= 0 and out[position].isspace():
        position -= 1
    if position >= 0 and out[position] == ",":
        del out[position]


# -- Loosely typed reply fields → the exact output types ---------------------------------

def as_text(value, default=""):
    """A string for an output text field: strings as is, other JSON values as JSON."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def as_text_list(value):
    """A list of non-empty strings: a lone string becomes a one-item list."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    texts = (as_text(item).strip() for item in items if item is not None)
    return [text for text in texts if text]


def as_fraction(value, default):
    """A score in 0..1. Models answer on 0-1, 0-10 or 0-100 scales, as numbers, as
    ``"8/10"`` or ``"85%"``; anything without a number gives ``default``."""
    number, scale = _number_and_scale(value)
    if number is None or not math.isfinite(number):
        return default
    if scale is None:
        scale = 1.0 if number <= 1 else 10.0 if number <= 10 else 100.0
    return min(1.0, max(0.0, number / scale)) if scale > 0 else default


def _number_and_scale(value):
    if isinstance(value, bool):
        return None, None
    if isinstance(value, (int, float)):
        return float(value), None
    if not isinstance(value, str):
        return None, None
    numbers = _NUMBER.findall(value)
    if not numbers:
        return None, None
    number = float(numbers[0])
    if "%" in value:
        return number, 100.0
    if "/" in value and len(numbers) > 1:
        return number, float(numbers[1])
    return number, None


def as_bool(value, default):
    """A boolean from true/false, yes/no, pass/fail (any case) or 0/1; else ``default``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return default


def as_index(value):
    """An integer index from 2, 2.0 or "2"; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    return None


def as_score_map(value):
    """``{criterion: score in 0..1}``; entries without a usable score are dropped."""
    if not isinstance(value, dict):
        return {}
    scores = {}
    for key, raw in value.items():
        score = as_fraction(raw, None)
        if score is not None:
            scores[str(key)] = score
    return scores
