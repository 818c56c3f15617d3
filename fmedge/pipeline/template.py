"""``{{ ... }}`` templates: resolve a stage's parameters against the data of a run.

Rules (flowmason-semantics.md §2.2-2.6, with the fixes of design.md §5):

* Namespaces: ``input`` (the pipeline input), ``upstream.<stage-id>...`` (outputs of the
  completed stages this stage may see), ``stages.<stage-id>.output...`` (the same outputs in
  the schema's spelling), ``env.NAME`` (the caller passes only allow-listed variables) and
  ``context`` (run_id, pipeline_id, stage_id, loop variables, ...).
* A plain path (``{{upstream.prepare-batch.batches[0]}}``, ``{{input.items.0}}``) is looked
  up key by key; numeric segments and ``[i]`` index arrays. Hyphenated stage ids are keys,
  never subtraction. A missing key fails, naming the path and what was there instead.
* Anything else inside the braces is a safe expression (``{{now()}}``,
  ``{{input.channel or 'web'}}``, ``{{len(input.items)}}``); see ``expr.py``. Inside an
  expression a missing key reads as null.
* A string that is exactly one template (outer whitespace ignored) keeps the value's JSON
  type. Otherwise each template is rendered into the text: strings as is, null as "",
  booleans as True/False, numbers as Python prints them, objects and arrays as JSON.
* ``coerce`` converts a resolved value to a component's declared field type (§2.6).

Templates are compiled once and cached, so resolving the same string again costs a dict
lookup plus the key lookups themselves.
"""

import functools
import json
import math
import operator
import re
from functools import lru_cache

from fmedge.errors import ExecutionError, ExpressionError, TemplateError
from fmedge.pipeline.expr import BUILTINS, DEFAULT_LIMITS, compile_expression

__all__ = ["NAMESPACES", "TemplateScope", "CompiledTemplate", "compile_template", "resolve",
           "compile_value", "fresh_copier", "render_string", "has_templates", "to_text",
           "coerce"]

NAMESPACES = ("input", "upstream", "stages", "env", "context")

# How many keys an error message lists before "...".
_MAX_LISTED_KEYS = 20
# Longest / most deeply bracketed text between {{ and }} (expressions refuse more anyway).
_MAX_INNER_CHARS = DEFAULT_LIMITS.max_source_chars
_MAX_INNER_DEPTH = DEFAULT_LIMITS.max_depth


class TemplateScope:
    """The namespaces one stage's templates read. Build one per stage execution.

    ``upstream`` maps stage id to stored output; ``stages`` is derived from it.
    ``env`` must already be filtered to the configured allow-list. ``clock`` feeds
    ``now()`` (seconds since the epoch, or a datetime). ``extra`` adds namespaces for a
    component's own templates (e.g. ``{"data": ...}`` for the gallery's json_transform
    ``template`` objects); it cannot replace the five standard ones. A subclass may leave
    ``context`` None and make it in ``_make_context`` when a template first reads it.
    """

    __slots__ = ("input", "upstream", "env", "_context", "clock", "extra", "_stages",
                 "_names")

    def __init__(self, input=None, upstream=None, env=None, context=None, *, clock=None,
                 extra=None):
        self.input = {} if input is None else input
        self.upstream = {} if upstream is None else upstream
        self.env = {} if env is None else env
        self._context = context
        self.clock = clock
        self.extra = {name: value for name, value in extra.items()
                      if name not in NAMESPACES} if extra else _NO_EXTRA
        self._stages = None
        self._names = None

    @property
    def context(self):
        if self._context is None:
            self._context = self._make_context()
        return self._context

    def _make_context(self):
        return {}

    @property
    def stages(self):
        """``{stage_id: {"output": output}}``, built on first use."""
        if self._stages is None:
            self._stages = {stage_id: {"output": output}
                            for stage_id, output in self.upstream.items()}
        return self._stages

    def names(self):
        """The variables an expression sees (one dict, reused by every expression)."""
        if self._names is None:
            names = dict(self.extra)
            names.update(input=self.input, upstream=self.upstream, stages=self.stages,
                         env=self.env, context=self.context)
            self._names = names
        return self._names

    def extra_namespace(self, name, text):
        """The value of an ``extra`` namespace, or TemplateError for an unknown one."""
        value = self.extra.get(name, _ABSENT)
        if value is _ABSENT:
            raise TemplateError(_unknown_namespace(text, name))
        return value


# ---------------------------------------------------------------------------------------
# Finding templates in a string


def _find_close(text, start):
    """Index of the ``}}`` that closes a template whose inner text starts at ``start``.

    Braces, brackets and quotes inside are balanced, so ``{{x or {'a': 1}}}`` works
    (the reference stops at the first ``}``). Returns -1 when the template never closes.
    The scan is bounded (an expression is at most that long and that deep anyway), so a
    string full of ``{{`` cannot make splitting quadratic in its whole length.
    """
    depth = 0
    quote = None
    index = start
    end = min(len(text), start + _MAX_INNER_CHARS)
    while index < end:
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "{[(":
            depth += 1
            if depth > _MAX_INNER_DEPTH:
                return -1
        elif char == "}" and depth == 0:
            return index if text.startswith("}}", index) else -1
        elif char in "}])":
            depth -= 1
            if depth < 0:
                return -1
        index += 1
    return -1


def _split(text):
    """Cut ``text`` into literal strings and ``_Inner`` template bodies."""
    parts = []
    literal_from = search_from = 0
    while True:
        start = text.find("{{", search_from)
        if start < 0:
            break
        end = _find_close(text, start + 2)
        if end <= start + 2:
            # Never closed, or "{{}}": plain text, as in the reference.
            search_from = start + 1
            continue
        if start > literal_from:
            parts.append(text[literal_from:start])
        parts.append(_Inner(text[start + 2:end]))
        literal_from = search_from = end + 2
    if literal_from < len(text):
        parts.append(text[literal_from:])
    return parts


class _Inner(str):
    """The text between ``{{`` and ``}}`` (a marker type during splitting)."""


# ---------------------------------------------------------------------------------------
# Compiled pieces: one per {{ ... }}


_HEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+|\[\d+\])*\Z")
_SEGMENT = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")


def _listing(keys):
    keys = [str(key) for key in keys]
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    if len(keys) > _MAX_LISTED_KEYS:
        shown += ", ... (%d in all)" % len(keys)
    return shown or "none"


def _kind(value):
    """A JSON-flavoured name for the type of ``value``."""
    if value is None:
        return "null"
    return {dict: "object", list: "array", tuple: "array", str: "string", bool: "boolean",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _parse_segments(rest):
    """``.a.0[1]`` -> ``(("a", None, ".a"), ("0", 0, ".0"), ("1", 1, "[1]"))``.

    Each segment is (dict key, array index or None, its spelling in the path).
    """
    segments = []
    for key, index in _SEGMENT.findall(rest):
        if index:
            segments.append((index, int(index), "[%s]" % index))
        else:
            segments.append((key, int(key) if key.isdigit() else None, "." + key))
    return tuple(segments)


class _PathPiece:
    """``namespace(.key|.N|[N])*``: dict keys and array indexes, nothing else."""

    __slots__ = ("text", "head", "segments", "_keys", "_root", "_fallback")

    def __init__(self, text):
        self.text = text
        self.head = _HEAD.match(text).group()
        self.segments = _parse_segments(text[len(self.head):])
        self._keys = tuple(key for key, _, _ in self.segments)
        self._root = operator.attrgetter(self.head) if self.head in NAMESPACES else None
        if self.head == "env" and len(self.segments) != 1:
            raise TemplateError(
                "Template {{%s}}: environment values are read as {{env.NAME}}, one name, "
                "no deeper path" % text)
        # "{{input.count-1}}" is a path first; if that key is missing it may be arithmetic.
        self._fallback = None
        if any("-" in key for key, _, _ in self.segments):
            try:
                self._fallback = compile_expression(text)
            except ExpressionError:
                self._fallback = None

    def value(self, scope):
        if self._root is not None:
            root = self._root(scope)
        else:
            root = scope.extra_namespace(self.head, self.text)
        current = root
        for key in self._keys:       # the common case: keys of dicts, all there
            if type(current) is not dict:
                return self._walk(scope, root)
            current = current.get(key, _ABSENT)
            if current is _ABSENT:
                return self._walk(scope, root)
        return current

    def _walk(self, scope, current):
        """The path under every rule: array indexes, and what to say when it is missing."""
        for depth, (key, index, _) in enumerate(self.segments):
            if isinstance(current, dict):
                found = current.get(key, _ABSENT)
                if found is _ABSENT:
                    return self._missing(scope, current, depth)
                current = found
            elif isinstance(current, (list, tuple)) and index is not None:
                if index >= len(current):
                    return self._missing(scope, current, depth)
                current = current[index]
            else:
                return self._missing(scope, current, depth)
        return current

    def _missing(self, scope, container, depth):
        if self._fallback is not None and "-" in self.segments[depth][0]:
            try:
                return self._fallback.evaluate(scope.names(), clock=scope.clock)
            except ExpressionError:
                pass  # not arithmetic either: report the missing key below
        raise TemplateError(self._explain(container, depth))

    def _explain(self, container, depth):
        key = self.segments[depth][0]
        where = self.head + "".join(spelling for _, _, spelling in self.segments[:depth])
        if isinstance(container, dict):
            problem = "%s has no key %r (available: %s)" % (where, key, _listing(container))
        elif isinstance(container, (list, tuple)):
            problem = ("%s is an array of length %d, so %r is not a valid index"
                       % (where, len(container), key))
        else:
            described = "null" if container is None else "a %s" % _kind(container)
            problem = "%s is %s, which has no key %r" % (where, described, key)
        return "Template {{%s}}: %s is missing: %s. %s" % (
            self.text, self.text, problem, self._hint(container, depth))

    def _hint(self, container, depth):
        if isinstance(container, (list, tuple)):
            return "Array indexes start at 0"
        if self.head in ("upstream", "stages") and depth == 0:
            return ("A stage's output is visible only after that stage has completed, to "
                    "stages that list it (directly or indirectly) in depends_on")
        if self.head == "env":
            return ("Only environment variables named in the env allow-list of the "
                    "configuration are visible, and this one is not set")
        if self.head == "stages" and depth == 1:
            return "Write {{stages.<id>.output.<field>}}"
        return ("Check the spelling, or write {{%s or <default>}} to allow a missing value"
                % self._as_expression())

    def _as_expression(self):
        """The path as an expression: ``items.0`` -> ``items[0]``, ``a-b`` -> ``['a-b']``."""
        spelled = []
        for key, index, spelling in self.segments:
            if index is not None:
                spelled.append("[%d]" % index)
            elif key.isidentifier():
                spelled.append(spelling)
            else:
                spelled.append("[%r]" % key)
        return self.head + "".join(spelled)


class _ExpressionPiece:
    """Any other ``{{ ... }}``: a safe expression over the namespaces."""

    __slots__ = ("text", "_compiled")

    def __init__(self, text):
        self.text = text
        self._compiled = compile_expression(_quote_stage_ids(text))

    def value(self, scope):
        return self._compiled.evaluate(scope.names(), clock=scope.clock)


# Python string literals, so that rewriting never touches text inside quotes.
_STRING_LITERAL = re.compile(
    r"'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"", re.S)
# upstream.<id> / stages.<id> where the id is not a Python name (hyphens, leading digit).
_ODD_STAGE_ID = re.compile(
    r"(?<![\w.])(upstream|stages)\.([A-Za-z0-9_]*-[A-Za-z0-9_-]*[A-Za-z0-9_]|[0-9][A-Za-z0-9_]*)")


def _quote_stage_ids(source):
    """``upstream.prepare-batch.x`` -> ``upstream['prepare-batch'].x`` outside string literals.

    Subtracting something from a stage's output object is never meaningful, so a hyphen
    right after ``upstream.``/``stages.`` always belongs to the stage id.
    """
    pieces = []
    position = 0
    for literal in _STRING_LITERAL.finditer(source):
        pieces.append(_ODD_STAGE_ID.sub(r"\1['\2']", source[position:literal.start()]))
        pieces.append(literal.group())
        position = literal.end()
    pieces.append(_ODD_STAGE_ID.sub(r"\1['\2']", source[position:]))
    return "".join(pieces)


_EXPRESSION_NAMES = frozenset(BUILTINS) | {"True", "False", "None"}


def _compile_piece(inner):
    text = inner.strip()
    if not text:
        raise TemplateError("Template {{%s}} is empty: write a path such as {{input.name}}"
                            % inner)
    # A plain path is a path, unless it names an expression builtin ({{math.pi}}).
    if _PATH.match(text) and _HEAD.match(text).group() not in _EXPRESSION_NAMES:
        return _PathPiece(text)
    return _ExpressionPiece(text)


def _unknown_namespace(text, head):
    rest = text[len(head):]
    if rest.startswith(".output"):
        rest = rest[len(".output"):]
    return ("Template {{%s}}: unknown namespace %r. Templates read input, upstream, stages, "
            "env or context; if %r is a stage id, write {{upstream.%s%s}}"
            % (text, head, head, head, rest))


_ABSENT = object()
_NO_EXTRA = {}   # shared, never written: most scopes have no extra namespaces


# ---------------------------------------------------------------------------------------
# Compiled templates and resolution


class CompiledTemplate:
    """A string with its ``{{ ... }}`` parts compiled; ``render(scope)`` fills them in."""

    __slots__ = ("text", "whole", "_parts")

    def __init__(self, text):
        parts = _split(text)
        pieces = [part for part in parts if isinstance(part, _Inner)]
        self.text = text
        self._parts = [_compile_piece(part) if isinstance(part, _Inner) else part
                       for part in parts]
        # Exactly one template and only whitespace around it: keep the value's type.
        self.whole = None
        if len(pieces) == 1 and all(isinstance(part, _Inner) or not part.strip()
                                    for part in parts):
            self.whole = next(part for part in self._parts if not isinstance(part, str))

    def render(self, scope):
        if self.whole is not None:
            return self.whole.value(scope)
        return "".join(part if type(part) is str else to_text(part.value(scope))
                       for part in self._parts)


@lru_cache(maxsize=4096)
def compile_template(text):
    """Compile (and cache) ``text``; raises TemplateError/ExpressionError if a part is bad."""
    return CompiledTemplate(text)


def render_string(text, scope):
    """Resolve the templates in one string. A lone template returns the raw value."""
    if "{{" not in text:
        return text
    return compile_template(text).render(scope)


def resolve(value, scope):
    """Resolve templates in ``value``: strings rendered, dicts and lists walked, rest kept.

    Returns new containers; the input (usually part of the pipeline document) is never
    changed. Dict keys are not templates.
    """
    try:
        return _resolve(value, scope)
    except RecursionError:
        raise TemplateError("Parameters are nested too deeply to resolve; flatten them"
                            ) from None


def _resolve(value, scope):
    if isinstance(value, str):
        return compile_template(value).render(scope) if "{{" in value else value
    if isinstance(value, dict):
        return {key: _resolve(item, scope) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(item, scope) for item in value]
    return value


def compile_value(value):
    """``resolve(value, scope)`` compiled once into a function of the scope: every template
    is parsed here, and the parts without templates are copied, not walked, on each call.
    A template that does not compile fails when resolved, as with ``resolve``."""
    try:
        return _compile_value(value)
    except RecursionError:    # absurdly deep: let resolve() report it on every call
        return functools.partial(resolve, value)


def _compile_value(value):
    if isinstance(value, str):
        return _compile_string(value) if "{{" in value else _constant(value)
    if not isinstance(value, (dict, list, tuple)):
        return _constant(value)
    if not has_templates(value):
        copy = fresh_copier(value)
        return lambda scope: copy()
    if isinstance(value, dict):
        parts = tuple((key, _compile_value(item)) for key, item in value.items())

        def resolve_dict(scope):
            resolved = {}
            for key, part in parts:
                resolved[key] = part(scope)
            return resolved
        return resolve_dict
    parts = tuple(_compile_value(item) for item in value)

    def resolve_list(scope):
        return [part(scope) for part in parts]
    return resolve_list


def _constant(value):
    return lambda scope: value


def _compile_string(text):
    try:
        compiled = compile_template(text)
    except Exception:  # noqa: BLE001 - raised again, the same way, when it is resolved
        return lambda scope: compile_template(text).render(scope)
    return compiled.render if compiled.whole is None else compiled.whole.value


def fresh_copier(value):
    """A function returning a new copy of the template-free ``value`` on each call (dicts
    and lists new, tuples as lists, as ``resolve`` returns them): what one run is given,
    another run never sees changed."""
    if isinstance(value, dict):
        nested = tuple((key, fresh_copier(item)) for key, item in value.items()
                       if isinstance(item, (dict, list, tuple)))
        if not nested:
            return functools.partial(dict, value)

        def copy_dict():
            fresh = dict(value)
            for key, copy in nested:
                fresh[key] = copy()
            return fresh
        return copy_dict
    if isinstance(value, (list, tuple)):
        if not any(isinstance(item, (dict, list, tuple)) for item in value):
            return functools.partial(list, value)
        parts = tuple(fresh_copier(item) for item in value)
        return lambda: [copy() for copy in parts]
    return lambda: value


def has_templates(value):
    """True if ``value`` (a string, or dicts/lists of them) contains a ``{{ ... }}``.

    Only looks for the syntax; it never compiles, so it does not raise on a bad template.
    """
    if isinstance(value, str):
        return "{{" in value and any(isinstance(part, _Inner) for part in _split(value))
    if isinstance(value, dict):
        return any(has_templates(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_templates(item) for item in value)
    return False


def to_text(value):
    """How a value appears inside a larger string (see the module docstring)."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            raise TemplateError("A %s value cannot be rendered as JSON text (circular, too "
                                "deep, or keys that are not strings)" % _kind(value)
                                ) from None
    return str(value)


# ---------------------------------------------------------------------------------------
# Type coercion after resolution (semantics §2.6, with the gallery's leniencies)


_BASE_TYPES = {
    "str": "str", "string": "str", "text": "str",
    "int": "int", "integer": "int",
    "float": "float", "number": "number",
    "bool": "bool", "boolean": "bool",
    "list": "list", "array": "list",
    "dict": "dict", "object": "dict",
    "any": "any",
}
_TRUE_WORDS = frozenset(("true", "yes", "1", "on", "enabled"))
_FALSE_WORDS = frozenset(("false", "no", "0", "off", "disabled"))
# Longest numeric string we parse (CPython <= 3.10 parses long digit strings in quadratic time).
_MAX_NUMBER_TEXT = 1000


class _TypeSpec:
    __slots__ = ("base", "optional", "item", "text")

    def __init__(self, base, optional, item, text):
        self.base, self.optional, self.item, self.text = base, optional, item, text


@lru_cache(maxsize=256)
def _parse_type(text):
    """``str``, ``int?``, ``Optional[int]``, ``int | None``, ``list[str]``, ``dict[str, int]``."""
    original = text
    spec = text.strip()
    optional = False
    lowered = spec.lower()
    if lowered.startswith("optional[") and lowered.endswith("]"):
        spec, optional = spec[9:-1].strip(), True
    elif spec.endswith("?"):
        spec, optional = spec[:-1].strip(), True
    elif "|" in spec:
        variants = [part.strip() for part in spec.split("|")]
        others = [part for part in variants if part.lower() not in ("none", "null")]
        if len(others) != 1:
            raise ValueError("unions other than T | None are not supported")
        spec, optional = others[0], len(others) != len(variants)
    item = None
    bracket = spec.find("[")
    if bracket > 0 and spec.endswith("]"):
        inner = spec[bracket + 1:-1]
        spec = spec[:bracket].strip()
        # dict[str, T]: keys are always strings in JSON, so only T matters.
        item = _parse_type(inner.split(",", 1)[-1].strip())
    base = _BASE_TYPES.get(spec.lower())
    if base is None or (item is not None and base not in ("list", "dict")):
        raise ValueError("unknown type %r" % original)
    return _TypeSpec(base, optional, item, original)


def coerce(value, type_name, *, field=None, choices=None):
    """Convert a resolved value to the declared type ``type_name`` of ``field``.

    Types: str, int, float, number (int or float, kept as given), bool, list, dict, any,
    and the JSON-schema spellings (string, integer, boolean, array, object).
    ``list[T]``/``dict[str, T]`` coerce items; ``T?``, ``Optional[T]`` or ``T | None``
    accept null (nothing else does, not even ``any``). ``choices`` restricts the result to
    a list of literals (strings matched case-insensitively, returned in their declared
    spelling). Raises ExecutionError with code ``coercion_error`` naming the field, the
    value and the expected form.
    """
    label = field or "value"
    try:
        spec = _parse_type(type_name)
    except ValueError as exc:
        raise ExecutionError("Field %r declares type %r, which fm-edge cannot check: %s"
                             % (label, type_name, exc), code="coercion_error") from None
    result = _coerce(value, spec, label)
    if choices is not None and not (result is None and spec.optional):
        result = _choose(result, choices, label)
    return result


def _coerce(value, spec, label):
    if value is None:
        if spec.optional:
            return None
        raise _coercion_error(label, value, spec.text,
                              "a value is required (null is accepted only by optional fields)")
    return _CONVERTERS[spec.base](value, spec, label)


def _coercion_error(label, value, type_text, expected):
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    described = "null" if value is None else "%s %s" % (_kind(value), shown)
    return ExecutionError("Field %r: cannot use %s as %s: %s"
                          % (label, described, type_text, expected), code="coercion_error")


def _to_str(value, spec, label):
    # Lenient (reference rejects non-strings): numbers, booleans and JSON values are
    # rendered as they would be inside a larger string.
    return to_text(value)


def _parse_number(text):
    """Numeric text as an int when it is one, else as a float; None if it is no number."""
    text = text.strip()
    if not text or len(text) > _MAX_NUMBER_TEXT:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _to_int(value, spec, label):
    number = _parse_number(value) if isinstance(value, str) else value
    if isinstance(number, int):   # bools too: True -> 1, as in the reference
        return int(number)
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _coercion_error(label, value, spec.text, "expected a whole number such as 3 or \"3\"")


def _to_float(value, spec, label):
    number = _parse_number(value) if isinstance(value, str) else value
    if isinstance(number, (int, float)):
        return float(number)
    raise _coercion_error(label, value, spec.text, "expected a number such as 0.5 or \"0.5\"")


def _to_number(value, spec, label):
    """An int or a float, whichever the value already is (numeric text parsed)."""
    number = _parse_number(value) if isinstance(value, str) else value
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        return number
    raise _coercion_error(label, value, spec.text, "expected a number such as 3 or 0.5")


def _to_bool(value, spec, label):
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    # Lenient: 0 and 1 (the reference refuses every number).
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _coercion_error(label, value, spec.text,
                          "expected true/false (or yes/no, on/off, enabled/disabled, 1/0)")


def _to_list(value, spec, label):
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        value = _list_from_text(value, spec, label)
    if not isinstance(value, list):
        raise _coercion_error(label, value, spec.text,
                              "expected an array, a JSON array string or a comma-separated "
                              "string")
    if spec.item is None:
        return value
    return [_coerce(item, spec.item, "%s[%d]" % (label, index))
            for index, item in enumerate(value)]


def _list_from_text(text, spec, label):
    """A JSON array string, else (lenient, for the gallery's critic criteria) a
    comma-separated list: ``"clarity, tone"`` -> ``["clarity", "tone"]``."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    return [part.strip() for part in stripped.split(",") if part.strip()]


def _to_dict(value, spec, label):
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            value = parsed
    if not isinstance(value, dict):
        raise _coercion_error(label, value, spec.text,
                              "expected an object or a JSON object string")
    if spec.item is None:
        return value
    return {key: _coerce(item, spec.item, "%s.%s" % (label, key))
            for key, item in value.items()}


def _to_any(value, spec, label):
    return value


_CONVERTERS = {"str": _to_str, "int": _to_int, "float": _to_float, "number": _to_number,
               "bool": _to_bool, "list": _to_list, "dict": _to_dict, "any": _to_any}


def _choose(value, choices, label):
    """Match a literal: exact, then case-insensitive for strings, then numeric text."""
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    for choice in choices:
        if isinstance(value, str) and isinstance(choice, str):
            if value.strip().lower() == choice.lower():
                return choice
        elif isinstance(value, str) and isinstance(choice, (int, float)) \
                and not isinstance(choice, bool):
            try:
                if float(value.strip()) == choice:
                    return choice
            except ValueError:
                continue
        elif value == choice:
            return choice
    raise _coercion_error(label, value, "one of %s" % _listing(repr(c) for c in choices),
                          "pick one of the listed values")
