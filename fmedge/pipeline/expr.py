"""Safe expressions: a small Python subset, parsed with ``ast`` and run by our own evaluator.

Used by templates (``{{ input.mode or 'auto' }}``) and by the control-flow fields of
components (``condition_expression``, ``filter_expression``, ...). The grammar is the one of
flowmason-semantics.md §2.8; the hardening rules come from reliability.md §3.8.

How it works: the source is parsed in ``eval`` mode, every node is checked against a
whitelist, and each allowed node becomes a small Python closure. Nothing ever hands pipeline
text to the interpreter. Pipeline text is hostile input, so:

* attributes and names starting with ``_`` are refused, and attribute access only reaches
  dict keys and a fixed list of harmless methods per value type (no ``format``, no
  ``format_map``, nothing that reaches a class or a frame);
* the functions are wrappers we wrote (``getattr`` obeys the same rules as ``a.b``);
* every operation that can allocate or loop is bounded: integer size, sequence repetition,
  ``range`` length, format widths, string and list length, and a per-evaluation work budget
  charged by loop iterations and by the data that builtins walk;
* the source itself is bounded (characters, AST nodes, nesting depth).

Dict keys read like attributes (``input.items`` is the key ``items``: a key wins over a
method of the same name). A missing key reads as ``None``, and reading from ``None`` gives
``None``, so ``input.mode or 'auto'`` and ``input.customer.name or 'friend'`` work.
"""

import ast
import datetime
import math
import operator
import re
import time
from dataclasses import dataclass
from functools import lru_cache

from fmedge.errors import ExpressionError

__all__ = ["Limits", "DEFAULT_LIMITS", "CompiledExpression", "compile_expression", "evaluate"]


@dataclass(frozen=True)
class Limits:
    """Cost bounds for one expression. The defaults suit templates and conditions.

    ``max_work`` is in work units: one unit is about one item walked by a builtin
    (``sum``, ``sorted``, ``in``...), roughly 15 ns on a laptop; one AST node evaluated
    inside a loop costs ``STEP_COST`` units. The default is about 0.2 s of CPU on a laptop
    (a second or two on a Raspberry Pi): a comprehension over some 50,000 records.
    """

    max_source_chars: int = 10000
    max_nodes: int = 2000
    max_depth: int = 100
    max_work: int = 10000000
    max_length: int = 1000000
    max_int_bits: int = 4096
    max_range: int = 1000000
    max_format_width: int = 10000


DEFAULT_LIMITS = Limits()

# A closure call costs roughly ten times what a builtin spends on one item.
STEP_COST = 10
# Largest |ndigits| for round(): round(5, -10**7) computes 10**10**7 (seconds of CPU).
MAX_ROUND_DIGITS = 400
# Longest string int()/float() parse: CPython <= 3.10 converts long digit strings in
# quadratic time.
MAX_NUMBER_CHARS = 1300

_MISSING = object()


class _Fail(ExpressionError):
    """A problem found while evaluating; re-raised naming the expression source."""


# ---------------------------------------------------------------------------------------
# Evaluation state and cost accounting


class _Run:
    """State of one evaluation: the work budget, the limits, the clock, and the logical
    sizes of the containers seen so far (see ``_cost``)."""

    __slots__ = ("work_left", "limits", "clock", "sizes")

    def __init__(self, limits, clock):
        self.work_left = limits.max_work
        self.limits = limits
        self.clock = clock
        self.sizes = {}

    def charge(self, units):
        self.work_left -= units
        if self.work_left < 0:
            raise _Fail(
                "evaluation budget exhausted (%d work units): the expression loops over "
                "too much data; filter or shrink the data in an earlier stage"
                % self.limits.max_work
            )


_NESTED = (list, tuple, dict, set, frozenset)
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINERS = _NESTED + (range,) + _VIEWS
_SCALARS = (int, float, bool, type(None))
_WALKABLE = (str,) + _CONTAINERS


def _cost(run, value, depth=0):
    """Work units to walk ``value`` completely, as str(), ==, sorted() or hashing would.

    This is the *logical* size: a list holding the same big list twice costs twice. That
    is what makes aliasing bombs (``[[0] * 10**6] * 10**6``) pay for what serialising them
    would cost. Sizes are remembered per container for the run (keeping the object alive
    so its id cannot be reused), so walking the same data again is cheap in time while it
    is still charged in full.
    """
    kind = type(value)
    if kind is str:
        return len(value) >> 4  # strings are scanned at C speed
    if kind is range:
        return len(value)
    if not isinstance(value, _NESTED):
        if isinstance(value, _VIEWS):
            return len(value) + sum(_cost(run, item, depth + 1) for item in value)
        return 0
    known = run.sizes.get(id(value))
    if known is not None:
        return known[1]
    if depth > run.limits.max_depth:
        raise _Fail("data nested too deeply (over %d levels)" % run.limits.max_depth)
    size = len(value)
    for child in (value.values() if isinstance(value, dict) else value):
        child_kind = type(child)
        if child_kind is str:
            size += len(child) >> 4
        elif child_kind not in _SCALARS:
            size += _cost(run, child, depth + 1)
    run.sizes[id(value)] = (value, size)
    return size


def _sized(run, value):
    """Check a value the expression just created against the size limits, and charge it."""
    kind = type(value)
    if kind is str:
        size, cost = len(value), len(value) >> 1
    elif kind in _NESTED:
        size, cost = len(value), _cost(run, value)
    elif kind is int:
        return _check_int(run, value)
    else:
        return value
    if size > run.limits.max_length:
        raise _Fail(
            "result too large: a %s of length %d (limit %d)"
            % (_type_name(value), size, run.limits.max_length)
        )
    run.charge(cost)
    return value


def _check_int(run, value):
    if value.bit_length() > run.limits.max_int_bits:
        raise _Fail("integer too large (over %d bits)" % run.limits.max_int_bits)
    return value


def _check_length(run, length, what):
    """Refuse *before* allocating a string or list of ``length`` items."""
    if length > run.limits.max_length:
        raise _Fail(
            "%s would have length %d (limit %d)" % (what, length, run.limits.max_length)
        )


def _metered(run, iterator):
    """Yield from ``iterator``, charging one unit per item (for lazy iterables)."""
    for item in iterator:
        run.charge(1)
        yield item


def _iterate(run, value):
    """An iterable over ``value`` whose walk is paid for up front or item by item."""
    if value is None:
        raise _Fail("cannot iterate over null (a missing key?)")
    if isinstance(value, _WALKABLE):
        run.charge(_cost(run, value))
        return value
    return _metered(run, iter(value))


def _materialize(run, value):
    """A list holding the items of ``value``, paid for and size-checked."""
    return _sized(run, list(_iterate(run, value)))


def _type_name(value):
    if value is None:
        return "null"
    if isinstance(value, (_Function, _BoundMethod)):
        return "function"
    return type(value).__name__


# ---------------------------------------------------------------------------------------
# Callables exposed to expressions


class _Function:
    """A whitelisted callable known to expressions as ``name``.

    ``impl(run, *args, **kwargs)``; ``python_type`` is set for type-like functions
    (``str``, ``int``...) so that ``isinstance(x, str)`` works.
    """

    __slots__ = ("name", "impl", "python_type")

    def __init__(self, name, impl, python_type=None):
        self.name = name
        self.impl = impl
        self.python_type = python_type

    def __repr__(self):
        return "<function %s>" % self.name


class _BoundMethod:
    """A whitelisted method bound to a value: ``impl(run, receiver, *args, **kwargs)``."""

    __slots__ = ("receiver", "name", "impl")

    def __init__(self, receiver, name, impl):
        self.receiver = receiver
        self.name = name
        self.impl = impl

    def __repr__(self):
        return "<method %s of %s>" % (self.name, _type_name(self.receiver))


def _invoke(run, func, args, kwargs):
    """Call an expression-level callable; anything else is refused."""
    kind = type(func)
    if kind is not _Function and kind is not _BoundMethod:
        if func is None:
            raise _Fail("cannot call null (a missing key or a misspelt method?)")
        raise _Fail("a %s is not callable" % _type_name(func))
    run.charge(STEP_COST)
    impl, label = func.impl, func.name
    try:
        if kind is _Function:
            return impl(run, *args, **kwargs)
        return impl(run, func.receiver, *args, **kwargs)
    except TypeError as exc:
        # Name the function as the expression wrote it, not our implementation.
        raise _Fail("%s(): %s" % (label, str(exc).replace(impl.__name__, label))) from None


def _as_callable(run, func):
    """Turn an expression-level function into a Python callable (for ``key=``, ``map``)."""
    if type(func) not in (_Function, _BoundMethod):
        raise _Fail("expected a function, got a %s" % _type_name(func))

    def call(*args):
        return _invoke(run, func, list(args), {})

    return call


# ---------------------------------------------------------------------------------------
# Attribute and item access


def _get_attribute(value, name, default=_MISSING):
    """``value.name`` under the dialect's rules (names starting with ``_`` never get here)."""
    if isinstance(value, dict):
        found = value.get(name, _MISSING)
        if found is not _MISSING:
            return found
        method = _DICT_METHODS.get(name)
        if method is not None:
            return _BoundMethod(value, name, method)
        return None if default is _MISSING else default
    if value is None:
        return None if default is _MISSING else default
    methods = _methods_for(value)
    method = methods.get(name) if methods else None
    if method is not None:
        return _BoundMethod(value, name, method)
    if default is not _MISSING:
        return default
    raise _Fail("a %s has no attribute %r" % (_type_name(value), name))


def _methods_for(value):
    table = _METHODS_BY_TYPE.get(type(value))
    if table is None:
        for kind, methods in _METHODS_BY_TYPE.items():
            if isinstance(value, kind):
                return methods
    return table


def _get_item(run, value, key):
    """``value[key]``: a missing dict key or a subscript of null gives ``None``."""
    if isinstance(value, dict):
        return value.get(key)
    if value is None:
        return None
    if isinstance(value, (str, list, tuple, range)):
        if type(key) is slice:
            return _sized(run, value[key])
        try:
            return value[key]
        except IndexError:
            raise _Fail("index %r out of range for a %s of length %d"
                        % (key, _type_name(value), len(value))) from None
    raise _Fail("a %s cannot be indexed" % _type_name(value))


def _check_attribute_name(name):
    if not isinstance(name, str):
        raise _Fail("attribute name must be a string, got a %s" % _type_name(name))
    if name.startswith("_"):
        raise _Fail("attribute %r is not allowed (names starting with '_' are private)" % name)


# ---------------------------------------------------------------------------------------
# Operators with cost checks


def _pow(run, base, exponent, modulus=None):
    """``base ** exponent`` refusing integer results beyond ``max_int_bits``."""
    if modulus is not None:
        for number in (base, exponent, modulus):
            if isinstance(number, int):
                _check_int(run, number)
        return pow(base, exponent, modulus)
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0
            and base not in (-1, 0, 1)):
        if (abs(base).bit_length() - 1) * exponent > run.limits.max_int_bits:
            raise _Fail("%d ** %d is too large (over %d bits)"
                        % (base, exponent, run.limits.max_int_bits))
    return _sized(run, base ** exponent)


def _repeat_length(a, b):
    """Length of ``a * b`` when it is a sequence repetition, else None."""
    if isinstance(a, (str, list, tuple)) and isinstance(b, int):
        return len(a) * max(b, 0)
    if isinstance(b, (str, list, tuple)) and isinstance(a, int):
        return len(b) * max(a, 0)
    return None


def _op_mul(run, a, b):
    length = _repeat_length(a, b)
    if length is not None:
        _check_length(run, length, "repetition")
        return _repeat(run, a, b) if isinstance(a, (str, list, tuple)) else _repeat(run, b, a)
    if isinstance(a, int) and isinstance(b, int):
        if a.bit_length() + b.bit_length() > run.limits.max_int_bits + 1:
            raise _Fail("integer product too large (over %d bits)" % run.limits.max_int_bits)
    return _sized(run, a * b)


def _repeat(run, sequence, times):
    """``sequence * times``, paying its logical size *before* building it."""
    if type(sequence) is str:
        return _sized(run, sequence * times)
    cost = _cost(run, sequence) * max(times, 0)
    run.charge(cost)
    result = sequence * times
    run.sizes[id(result)] = (result, cost)
    return result


def _op_add(run, a, b):
    if isinstance(a, (str, list, tuple)) and isinstance(b, (str, list, tuple)):
        _check_length(run, len(a) + len(b), "concatenation")
    return _sized(run, a + b)


def _op_mod(run, a, b):
    if isinstance(a, str):
        # '%*d' % (10**9, 1) allocates a gigabyte; f-strings have checked widths.
        raise _Fail("'%' string formatting is not supported; use an f-string")
    return a % b


def _op_lshift(run, a, b):
    if isinstance(a, int) and isinstance(b, int) and a and b > 0:
        if a.bit_length() + b > run.limits.max_int_bits:
            raise _Fail("%d << %d is too large (over %d bits)"
                        % (a, b, run.limits.max_int_bits))
    return a << b


def _checked(fn):
    """Wrap a plain binary operator so its result goes through the size checks."""
    def op(run, a, b):
        return _sized(run, fn(a, b))
    return op


_BINARY_OPERATORS = {
    ast.Add: _op_add,
    ast.Sub: _checked(operator.sub),
    ast.Mult: _op_mul,
    ast.Div: lambda run, a, b: a / b,
    ast.FloorDiv: lambda run, a, b: a // b,
    ast.Mod: _op_mod,
    ast.Pow: _pow,
    ast.LShift: _op_lshift,
    ast.RShift: lambda run, a, b: a >> b,
    ast.BitOr: _checked(operator.or_),
    ast.BitXor: _checked(operator.xor),
    ast.BitAnd: _checked(operator.and_),
}

_UNARY_OPERATORS = {
    ast.Not: operator.not_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
}


def _contains(run, container, item):
    if container is None:
        raise _Fail("cannot test membership in null (a missing key?)")
    # Hashed containers only hash the item; the others compare it with every element.
    hashed = isinstance(container, (dict, set, frozenset))
    run.charge(_cost(run, item) if hashed else _cost(run, container))
    return item in container


def _comparing(fn):
    """A comparison that pays for walking container operands (``[..] == [..]``)."""
    def compare(run, a, b):
        if isinstance(a, _NESTED):
            run.charge(_cost(run, a))
        return fn(a, b)
    return compare


_ORDERINGS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
              ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}

_COMPARISONS = {
    ast.Eq: _comparing(operator.eq),
    ast.NotEq: _comparing(operator.ne),
    ast.Lt: _comparing(operator.lt),
    ast.LtE: _comparing(operator.le),
    ast.Gt: _comparing(operator.gt),
    ast.GtE: _comparing(operator.ge),
    ast.Is: lambda run, a, b: a is b,
    ast.IsNot: lambda run, a, b: a is not b,
    ast.In: lambda run, a, b: _contains(run, b, a),
    ast.NotIn: lambda run, a, b: not _contains(run, b, a),
}


# ---------------------------------------------------------------------------------------
# Builtin functions (all receive the run first)


def fn_len(run, value):
    return len(value)


def fn_str(run, value=""):
    if type(value) is str:
        return value
    run.charge(_cost(run, value))
    return _sized(run, str(value))


def _check_number_text(text):
    if len(text) > MAX_NUMBER_CHARS:
        raise _Fail("number text too long (%d characters, limit %d)"
                    % (len(text), MAX_NUMBER_CHARS))


def fn_int(run, value=0, *base):
    if isinstance(value, str):
        _check_number_text(value)
    return _check_int(run, int(value, *base))


def fn_float(run, value=0.0):
    if isinstance(value, str):
        _check_number_text(value)
    return float(value)


def fn_bool(run, value=False):
    return bool(value)


def fn_list(run, value=()):
    return _materialize(run, value)


def fn_tuple(run, value=()):
    return tuple(_materialize(run, value))


def fn_set(run, value=()):
    return _sized(run, set(_iterate(run, value)))


def fn_dict(run, *args, **kwargs):
    if len(args) > 1:
        raise TypeError("dict expected at most 1 argument, got %d" % len(args))
    if args and isinstance(args[0], dict):
        run.charge(len(args[0]))
    elif args:
        args = (_iterate(run, args[0]),)
    return _sized(run, dict(*args, **kwargs))


def fn_abs(run, value):
    return abs(value)


def fn_round(run, value, ndigits=None):
    if ndigits is None:
        return round(value)
    if isinstance(ndigits, int) and abs(ndigits) > MAX_ROUND_DIGITS:
        raise _Fail("round(): ndigits must be within +-%d" % MAX_ROUND_DIGITS)
    return round(value, ndigits)


def fn_divmod(run, a, b):
    return divmod(a, b)


def fn_pow(run, base, exponent, modulus=None):
    return _pow(run, base, exponent, modulus)


def _extreme(run, pick, args, kwargs):
    """``min``/``max`` with Python's calling conventions and a paid-for walk."""
    options = {}
    key = kwargs.pop("key", None)
    if key is not None:
        options["key"] = _as_callable(run, key)
    if "default" in kwargs:
        options["default"] = kwargs.pop("default")
    if kwargs:
        raise TypeError("unexpected keyword argument %r" % next(iter(kwargs)))
    items = _materialize(run, args[0]) if len(args) == 1 else list(args)
    return pick(items, **options)


def fn_min(run, *args, **kwargs):
    return _extreme(run, min, args, kwargs)


def fn_max(run, *args, **kwargs):
    return _extreme(run, max, args, kwargs)


def fn_sum(run, iterable, start=0):
    # Summing lists or strings is quadratic; with a numeric start, Python itself refuses
    # any item that is not a number.
    if not isinstance(start, (int, float)):
        raise _Fail("sum() adds numbers, got a %s start; use a comprehension or "
                    "''.join(...) to combine other values" % _type_name(start))
    return _sized(run, sum(_iterate(run, iterable), start))


def fn_sorted(run, iterable, key=None, reverse=False):
    items = _materialize(run, iterable)
    # About log2(n) comparisons per item, each walking the items compared.
    run.charge(_cost(run, items) * max(1, len(items).bit_length()))
    if key is None:
        return sorted(items, reverse=reverse)
    return sorted(items, key=_as_callable(run, key), reverse=reverse)


def fn_reversed(run, sequence):
    if isinstance(sequence, dict):
        sequence = list(sequence)
    return _materialize(run, reversed(sequence))


def fn_enumerate(run, iterable, start=0):
    return _metered(run, enumerate(_iterate(run, iterable), start))


def fn_zip(run, *iterables):
    return _metered(run, zip(*[_iterate(run, item) for item in iterables]))


def fn_range(run, *args):
    span = range(*args)
    try:
        too_big = len(span) > run.limits.max_range
    except OverflowError:
        too_big = True
    if too_big:
        raise _Fail("range() is too large (limit %d items)" % run.limits.max_range)
    return span


def fn_any(run, iterable):
    return any(_iterate(run, iterable))


def fn_all(run, iterable):
    return all(_iterate(run, iterable))


def fn_filter(run, func, iterable):
    keep = bool if func is None else _as_callable(run, func)
    return (item for item in _iterate(run, iterable) if keep(item))


def fn_map(run, func, *iterables):
    if not iterables:
        raise TypeError("map() must have at least two arguments")
    call = _as_callable(run, func)
    return (call(*items) for items in zip(*[_iterate(run, item) for item in iterables]))


def _python_types(spec):
    """The Python types behind ``isinstance``'s second argument (functions like ``str``)."""
    specs = spec if isinstance(spec, (tuple, list)) else (spec,)
    types = []
    for item in specs:
        if type(item) is not _Function or item.python_type is None:
            raise _Fail("isinstance() takes a type such as str, int, float, bool, "
                        "list, dict (or a tuple of them), got a %s" % _type_name(item))
        types.append(item.python_type)
    return tuple(types)


def fn_isinstance(run, value, spec):
    return isinstance(value, _python_types(spec))


def fn_getattr(run, value, name, *default):
    _check_attribute_name(name)
    return _get_attribute(value, name, *default)


def fn_hasattr(run, value, name):
    _check_attribute_name(name)
    if isinstance(value, dict):
        return name in value or name in _DICT_METHODS
    methods = _methods_for(value) if value is not None else None
    return bool(methods) and name in methods


def _utc_now(run):
    """The clock reading as an aware UTC datetime (the clock may give seconds or a datetime)."""
    reading = run.clock() if run.clock is not None else time.time()
    if isinstance(reading, datetime.datetime):
        if reading.tzinfo is None:
            return reading.replace(tzinfo=datetime.timezone.utc)
        return reading.astimezone(datetime.timezone.utc)
    return datetime.datetime.fromtimestamp(reading, datetime.timezone.utc)


def fn_now(run):
    """ISO-8601 UTC timestamp with milliseconds, e.g. ``2024-05-01T12:00:00.000+00:00``."""
    return _utc_now(run).isoformat(timespec="milliseconds")


def fn_time(run):
    """Seconds since the epoch (for the gallery's ``str(int(time.time()))``)."""
    return _utc_now(run).timestamp()


def _plain_function(name, fn):
    """Expose a pure numeric function (from ``math``) that ignores the run."""
    def impl(run, *args):
        return fn(*args)
    impl.__name__ = name
    return _Function("math." + name, impl)


_MATH_FUNCTIONS = ("sqrt", "floor", "ceil", "log", "log10", "log2", "exp", "sin", "cos",
                   "tan", "isnan", "isinf", "isfinite", "fabs", "trunc")
_MATH = dict({name: _plain_function(name, getattr(math, name)) for name in _MATH_FUNCTIONS},
             pi=math.pi, e=math.e, inf=math.inf, nan=math.nan)


def _builtin_table():
    table = {}
    typed = {"int": (fn_int, int), "float": (fn_float, float), "str": (fn_str, str),
             "bool": (fn_bool, bool), "list": (fn_list, list), "dict": (fn_dict, dict),
             "tuple": (fn_tuple, tuple), "set": (fn_set, set)}
    for name, (impl, python_type) in typed.items():
        table[name] = _Function(name, impl, python_type)
    plain = {"len": fn_len, "abs": fn_abs, "round": fn_round, "divmod": fn_divmod,
             "pow": fn_pow, "min": fn_min, "max": fn_max, "sum": fn_sum,
             "sorted": fn_sorted, "reversed": fn_reversed, "enumerate": fn_enumerate,
             "zip": fn_zip, "range": fn_range, "any": fn_any, "all": fn_all,
             "filter": fn_filter, "map": fn_map, "isinstance": fn_isinstance,
             "getattr": fn_getattr, "hasattr": fn_hasattr, "now": fn_now}
    for name, impl in plain.items():
        table[name] = _Function(name, impl)
    table["math"] = _MATH
    table["time"] = {"time": _Function("time.time", fn_time)}
    return table


BUILTINS = _builtin_table()

# Names people reach for that are deliberately absent, with what to use instead.
_REFUSED_NAMES = {
    "type": "use isinstance(x, str)",
    "format": "use an f-string such as f'{x:.2f}'",
    "eval": "expressions cannot run code", "exec": "expressions cannot run code",
    "compile": "expressions cannot run code", "open": "expressions cannot read files",
    "vars": "read values by name", "globals": "read values by name",
    "locals": "read values by name", "dir": "read values by name",
    "setattr": "expressions cannot change values", "delattr": "expressions cannot change values",
}


# ---------------------------------------------------------------------------------------
# Methods per value type


def _method(name):
    """A method that cannot amplify its receiver: pay for the scan, check the result."""
    def impl(run, receiver, *args, **kwargs):
        run.charge(_cost(run, receiver))
        return _sized(run, getattr(receiver, name)(*args, **kwargs))
    impl.__name__ = name
    return impl


def str_join(run, separator, iterable):
    items = _materialize(run, iterable)
    length = len(separator) * max(len(items) - 1, 0)
    for item in items:
        if not isinstance(item, str):
            raise _Fail("join() needs strings, found a %s; convert with str() first"
                        % _type_name(item))
        length += len(item)
    _check_length(run, length, "join()")
    return _sized(run, separator.join(items))


def str_replace(run, text, old, new, count=-1):
    if not (isinstance(old, str) and isinstance(new, str)):
        raise _Fail("replace() needs strings")
    hits = len(text) + 1 if old == "" else text.count(old)
    if count >= 0:
        hits = min(hits, count)
    _check_length(run, len(text) + hits * (len(new) - len(old)), "replace()")
    return _sized(run, text.replace(old, new, count))


def _padding(name):
    """``center``/``ljust``/``rjust``/``zfill`` with a bounded width."""
    def impl(run, text, width, *fill):
        if isinstance(width, int) and width > max(len(text), run.limits.max_format_width):
            raise _Fail("%s() width %d is too large (limit %d)"
                        % (name, width, run.limits.max_format_width))
        return getattr(text, name)(width, *fill)
    impl.__name__ = name
    return impl


_STR_METHOD_NAMES = (
    "capitalize casefold count endswith find index isalnum isalpha isascii isdecimal "
    "isdigit isidentifier islower isnumeric isspace istitle isupper lower lstrip partition "
    "removeprefix removesuffix rfind rindex rpartition rsplit rstrip split splitlines "
    "startswith strip swapcase title upper"
).split()

_STR_METHODS = {name: _method(name) for name in _STR_METHOD_NAMES}
_STR_METHODS.update({name: _padding(name) for name in ("center", "ljust", "rjust", "zfill")})
_STR_METHODS.update(join=str_join, replace=str_replace)

def dict_get(run, mapping, key, default=None):
    return mapping.get(key, default)


def _view(name):
    """``keys``/``values``/``items``: O(1) views, paid for when something walks them."""
    def impl(run, mapping):
        return getattr(mapping, name)()
    impl.__name__ = name
    return impl


# Only methods that do not mutate: data passed in is shared with other stages.
_DICT_METHODS = {name: _view(name) for name in ("keys", "values", "items")}
_DICT_METHODS.update(get=dict_get, copy=_method("copy"))
_LIST_METHODS = {name: _method(name) for name in ("count", "index", "copy")}
_TUPLE_METHODS = {name: _method(name) for name in ("count", "index")}
_SET_METHODS = {name: _method(name) for name in (
    "union", "intersection", "difference", "symmetric_difference", "issubset",
    "issuperset", "isdisjoint", "copy")}

_METHODS_BY_TYPE = {
    str: _STR_METHODS,
    list: _LIST_METHODS,
    tuple: _TUPLE_METHODS,
    set: _SET_METHODS,
    frozenset: _SET_METHODS,
    float: {"is_integer": _method("is_integer")},
}


# ---------------------------------------------------------------------------------------
# Validation: what the source may contain


_ALLOWED_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.Attribute,
    ast.Subscript, ast.Slice, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.And, ast.Or,
    ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Starred, ast.List, ast.Tuple,
    ast.Set, ast.Dict, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
    ast.comprehension, ast.JoinedStr, ast.FormattedValue,
) + tuple(_BINARY_OPERATORS) + tuple(_UNARY_OPERATORS) + tuple(_COMPARISONS)

_REFUSED_NODES = {
    ast.Lambda: "lambda functions are not allowed",
    ast.NamedExpr: "assignments (:=) are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.MatMult: "the @ operator is not supported",
}


def _parse(source, limits):
    """Parse ``source`` as one expression, turning every parser failure into a _Fail."""
    if len(source) > limits.max_source_chars:
        raise _Fail("expression is %d characters long (limit %d)"
                    % (len(source), limits.max_source_chars))
    try:
        return ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise _Fail("%s at column %s" % (exc.msg, exc.offset)) from None
    except (RecursionError, MemoryError, ValueError):
        # Deeply nested source overflows the parser; a NUL byte raises ValueError.
        raise _Fail("expression is nested too deeply or malformed") from None


def _validate(tree, limits):
    """Walk the tree without recursion: size, depth, node types and names.

    Returns the set of names the expression reads.
    """
    names = set()
    count = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > limits.max_nodes:
            raise _Fail("expression is too large (over %d syntax nodes)" % limits.max_nodes)
        if depth > limits.max_depth:
            raise _Fail("expression is nested too deeply (over %d levels)" % limits.max_depth)
        _check_node(node, limits)
        if isinstance(node, ast.Name):
            names.add(node.id)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return names


def _check_node(node, limits):
    kind = type(node)
    if kind in _REFUSED_NODES:
        raise _Fail(_REFUSED_NODES[kind])
    if not isinstance(node, _ALLOWED_NODES):
        raise _Fail("%s is not allowed in expressions" % kind.__name__)
    # A lone "_" is the usual throwaway loop variable and reaches nothing private.
    if kind is ast.Name and node.id.startswith("_") and node.id != "_":
        raise _Fail("name %r is not allowed (names starting with '_' are private)" % node.id)
    if kind is ast.Attribute and node.attr.startswith("_"):
        raise _Fail("attribute %r is not allowed (names starting with '_' are private)"
                    % node.attr)
    if kind is ast.Constant:
        _check_constant(node.value, limits)
    if kind is ast.comprehension and node.is_async:
        raise _Fail("async comprehensions are not allowed")


def _check_constant(value, limits):
    if value is None or isinstance(value, (bool, str, float)):
        return
    if isinstance(value, int):
        if value.bit_length() > limits.max_int_bits:
            raise _Fail("integer literal too large (over %d bits)" % limits.max_int_bits)
        return
    raise _Fail("%s literals are not supported" % type(value).__name__)


# ---------------------------------------------------------------------------------------
# Compilation: each node becomes a closure ``fn(run, env)``


class _Compiler:
    """Turns a validated tree into nested closures; ``env`` maps names to values."""

    def compile(self, node):
        method = _DISPATCH.get(type(node))
        if method is None:
            raise _Fail("%s is not allowed here" % type(node).__name__)
        return method(self, node)

    def expression(self, node):
        return self.compile(node.body)

    def constant(self, node):
        value = node.value
        return lambda run, env: value

    def name(self, node):
        key = node.id
        builtin = BUILTINS.get(key, _MISSING)
        refused = _REFUSED_NAMES.get(key)

        def load(run, env):
            value = env.get(key, _MISSING)
            if value is not _MISSING:
                return value
            if builtin is not _MISSING:
                return builtin
            if refused:
                raise _Fail("%r is not available: %s" % (key, refused))
            raise _Fail("name %r is not defined (available: %s)"
                        % (key, ", ".join(sorted(str(k) for k in env)) or "none"))
        return load

    def attribute(self, node):
        return self._path(node)

    def subscript(self, node):
        if isinstance(node.slice, ast.Constant):
            return self._path(node)
        target = self.compile(node.value)
        key = self.compile(node.slice)
        return lambda run, env: _get_item(run, target(run, env), key(run, env))

    def _path(self, node):
        """``a.b['c'].d``: one closure walking the keys, not one closure per step."""
        steps = []
        while True:
            if isinstance(node, ast.Attribute):
                steps.append((False, node.attr))
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                steps.append((True, node.slice.value))
            else:
                break
            node = node.value
        steps.reverse()
        target = self.compile(node)
        name = node.id if isinstance(node, ast.Name) else None

        def walk(run, env):
            value = env.get(name, _MISSING) if name is not None else _MISSING
            if value is _MISSING:
                value = target(run, env)
            for is_item, key in steps:
                if type(value) is dict:   # the common case, inline: a key, else the rules
                    found = value.get(key, _MISSING)
                    if found is not _MISSING:
                        value = found
                        continue
                value = _get_item(run, value, key) if is_item else _get_attribute(value, key)
            return value
        return walk

    def slice(self, node):
        parts = [self.compile(part) if part is not None else None
                 for part in (node.lower, node.upper, node.step)]

        def build(run, env):
            return slice(*[part(run, env) if part else None for part in parts])
        return build

    def binop(self, node):
        left, right = self.compile(node.left), self.compile(node.right)
        op = _BINARY_OPERATORS[type(node.op)]
        return lambda run, env: op(run, left(run, env), right(run, env))

    def unaryop(self, node):
        operand = self.compile(node.operand)
        op = _UNARY_OPERATORS[type(node.op)]
        return lambda run, env: op(operand(run, env))

    def boolop(self, node):
        values = [self.compile(value) for value in node.values]
        want = isinstance(node.op, ast.Or)

        def short_circuit(run, env):
            # Python semantics: return the first operand that decides, else the last.
            for value in values[:-1]:
                result = value(run, env)
                if bool(result) is want:
                    return result
            return values[-1](run, env)
        return short_circuit

    def compare(self, node):
        first = self.compile(node.left)
        steps = [(_COMPARISONS[type(op)], self.compile(right))
                 for op, right in zip(node.ops, node.comparators)]
        if len(steps) == 1:
            op, right = steps[0]
            plain = _ORDERINGS.get(type(node.ops[0]))
            if plain is not None:     # fewer closures for the most common expressions
                return self._ordering(plain, first, right, node.comparators[0])
            return lambda run, env: op(run, first(run, env), right(run, env))

        def chained(run, env):
            left = first(run, env)
            for op, right_fn in steps:
                right = right_fn(run, env)
                if not op(run, left, right):
                    return False
                left = right
            return True
        return chained

    @staticmethod
    def _ordering(plain, first, right, right_node):
        if isinstance(right_node, ast.Constant):
            constant = right_node.value

            def against_constant(run, env):
                left = first(run, env)
                if isinstance(left, _NESTED):
                    run.charge(_cost(run, left))
                return plain(left, constant)
            return against_constant

        def ordering(run, env):
            left, right_value = first(run, env), right(run, env)
            if isinstance(left, _NESTED):
                run.charge(_cost(run, left))
            return plain(left, right_value)
        return ordering

    def ifexp(self, node):
        test, body, orelse = (self.compile(n) for n in (node.test, node.body, node.orelse))
        return lambda run, env: body(run, env) if test(run, env) else orelse(run, env)

    def call(self, node):
        func = self.compile(node.func)
        args = self._sequence(node.args)
        keywords = [(kw.arg, self.compile(kw.value)) for kw in node.keywords]

        def call(run, env):
            target = func(run, env)
            kwargs = {}
            for name, value in keywords:
                if name is not None:
                    kwargs[name] = value(run, env)
                else:
                    kwargs.update(_keyword_mapping(value(run, env)))
            return _invoke(run, target, args(run, env), kwargs)
        return call

    def _sequence(self, elements):
        """Closure building a list from elements that may be ``*starred`` (callers check
        the size of what they build from it)."""
        plan = [(True, self.compile(el.value)) if isinstance(el, ast.Starred)
                else (False, self.compile(el)) for el in elements]
        if not any(starred for starred, _ in plan):
            fns = [fn for _, fn in plan]
            return lambda run, env: [fn(run, env) for fn in fns]

        def build(run, env):
            items = []
            for starred, fn in plan:
                if starred:
                    items.extend(_materialize(run, fn(run, env)))
                else:
                    items.append(fn(run, env))
            return items
        return build

    def list_display(self, node):
        build = self._sequence(node.elts)
        return lambda run, env: _sized(run, build(run, env))

    def tuple_display(self, node):
        build = self._sequence(node.elts)
        return lambda run, env: _sized(run, tuple(build(run, env)))

    def set_display(self, node):
        build = self._sequence(node.elts)
        return lambda run, env: _sized(run, set(build(run, env)))

    def dict_display(self, node):
        plan = [(self.compile(k) if k is not None else None, self.compile(v))
                for k, v in zip(node.keys, node.values)]

        def build(run, env):
            result = {}
            for key, value in plan:
                if key is None:
                    result.update(_keyword_mapping(value(run, env), what="**"))
                else:
                    result[key(run, env)] = value(run, env)
            return _sized(run, result)
        return build

    def joinedstr(self, node):
        parts = [self.compile(value) for value in node.values]

        def build(run, env):
            pieces = [part(run, env) for part in parts]
            _check_length(run, sum(len(piece) for piece in pieces), "f-string")
            return _sized(run, "".join(pieces))
        return build

    def formattedvalue(self, node):
        value = self.compile(node.value)
        spec = self.compile(node.format_spec) if node.format_spec is not None else None
        convert = {-1: None, ord("s"): str, ord("r"): repr, ord("a"): ascii}[node.conversion]

        def render(run, env):
            result = value(run, env)
            run.charge(_cost(run, result))
            if convert is not None:
                result = _sized(run, convert(result))
            format_spec = spec(run, env) if spec is not None else ""
            _check_format_spec(run, format_spec)
            return format(result, format_spec)
        return render

    def comprehension(self, node):
        return _Comprehension(self, node).closure()

    def starred(self, node):
        raise _Fail("a *starred expression is only allowed in a call or a display")


_DISPATCH = {
    ast.Expression: _Compiler.expression,
    ast.Constant: _Compiler.constant,
    ast.Name: _Compiler.name,
    ast.Attribute: _Compiler.attribute,
    ast.Subscript: _Compiler.subscript,
    ast.Slice: _Compiler.slice,
    ast.BinOp: _Compiler.binop,
    ast.UnaryOp: _Compiler.unaryop,
    ast.BoolOp: _Compiler.boolop,
    ast.Compare: _Compiler.compare,
    ast.IfExp: _Compiler.ifexp,
    ast.Call: _Compiler.call,
    ast.List: _Compiler.list_display,
    ast.Tuple: _Compiler.tuple_display,
    ast.Set: _Compiler.set_display,
    ast.Dict: _Compiler.dict_display,
    ast.JoinedStr: _Compiler.joinedstr,
    ast.FormattedValue: _Compiler.formattedvalue,
    ast.ListComp: _Compiler.comprehension,
    ast.SetComp: _Compiler.comprehension,
    ast.DictComp: _Compiler.comprehension,
    ast.GeneratorExp: _Compiler.comprehension,
    ast.Starred: _Compiler.starred,
}

_DIGIT_RUNS = re.compile(r"\d+")


def _check_format_spec(run, spec):
    """Refuse format widths/precisions that would allocate huge strings."""
    if not isinstance(spec, str):
        raise _Fail("format spec must be a string")
    for digits in _DIGIT_RUNS.findall(spec):
        if len(digits) > 6 or int(digits) > run.limits.max_format_width:
            raise _Fail("format width %s is too large (limit %d)"
                        % (digits, run.limits.max_format_width))


def _keyword_mapping(value, what="**kwargs"):
    if not isinstance(value, dict):
        raise _Fail("%s needs a dict, got a %s" % (what, _type_name(value)))
    return value


class _Comprehension:
    """List/set/dict comprehensions and generator expressions with their own scope.

    Loop variables live in a copy of the enclosing ``env``, so they never leak out, and
    everything in scope (builtins, other names) stays visible inside (the reference's
    Python <= 3.11 scoping bug is deliberately not reproduced).
    """

    def __init__(self, compiler, node):
        self.kind = type(node)
        if self.kind is ast.DictComp:
            key, value = compiler.compile(node.key), compiler.compile(node.value)
            self.element = lambda run, env: (key(run, env), value(run, env))
        else:
            self.element = compiler.compile(node.elt)
        self.loops = [(self._target(gen.target), compiler.compile(gen.iter),
                       [compiler.compile(cond) for cond in gen.ifs])
                      for gen in node.generators]
        self.costs = self._iteration_costs(node)

    @staticmethod
    def _iteration_costs(node):
        """Work units of one iteration of each loop: what it evaluates before moving on."""
        element = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        gens = node.generators
        costs = []
        for index, gen in enumerate(gens):
            after = element if index + 1 == len(gens) else [gens[index + 1].iter]
            roots = [gen.target] + list(gen.ifs) + after
            nodes = sum(1 for root in roots for n in ast.walk(root) if isinstance(n, ast.expr))
            # Two more steps for the loop's own work: take the item, bind it.
            costs.append(STEP_COST * (nodes + 2))
        return costs

    def _target(self, node):
        """A function binding one loop item into ``env`` (names and nested tuples)."""
        if isinstance(node, ast.Name):
            name = node.id

            def bind(env, item):
                env[name] = item
            return bind
        if isinstance(node, (ast.Tuple, ast.List)):
            binders = [self._target(element) for element in node.elts]

            def unpack(env, item):
                values = tuple(item) if isinstance(item, (list, tuple)) else None
                if values is None or len(values) != len(binders):
                    raise _Fail("cannot unpack a %s into %d loop variables"
                                % (_type_name(item), len(binders)))
                for binder, value in zip(binders, values):
                    binder(env, value)
            return unpack
        raise _Fail("loop targets must be names or tuples of names")

    def _produce(self, run, env, index, iterable):
        bind, _, conditions = self.loops[index]
        cost = self.costs[index]
        last = index + 1 == len(self.loops)
        if iterable is None:
            raise _Fail("cannot loop over null (a missing key?)")
        for item in iterable:
            run.charge(cost)
            bind(env, item)
            if conditions and not all(cond(run, env) for cond in conditions):
                continue
            if last:
                yield self.element(run, env)
            else:
                yield from self._produce(run, env, index + 1,
                                         self.loops[index + 1][1](run, env))

    def closure(self):
        first_iter = self.loops[0][1]
        kind = self.kind

        def comprehend(run, env):
            # As in Python, the first iterable is evaluated in the outer scope.
            items = self._produce(run, dict(env), 0, first_iter(run, env))
            if kind is ast.GeneratorExp:
                return items
            if kind is ast.ListComp:
                return _sized(run, list(items))
            if kind is ast.SetComp:
                return _sized(run, set(items))
            return _sized(run, dict(items))
        return comprehend


# ---------------------------------------------------------------------------------------
# Public API


def _to_plain(run, value):
    """Make the top-level result JSON-friendly: lazy iterables become lists, and so on."""
    if isinstance(value, (str, int, float, list, dict)) or value is None:
        return value
    if isinstance(value, (_Function, _BoundMethod)):
        raise _Fail("the expression evaluates to a function; call it with ()")
    if isinstance(value, (set, frozenset)):
        items = _materialize(run, value)
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "__iter__"):
        return _materialize(run, value)
    return value


_new_run = object.__new__
_PLAIN = frozenset((str, int, float, bool, list, dict, type(None)))


def _describe(source):
    text = source.strip()
    return repr(text if len(text) <= 200 else text[:197] + "...")


class CompiledExpression:
    """A parsed, validated expression; evaluate it many times with different names."""

    __slots__ = ("source", "names", "_root", "_limits")

    def __init__(self, source, root, names, limits):
        self.source = source
        self.names = frozenset(names)
        self._root = root
        self._limits = limits

    def evaluate(self, names=None, *, clock=None):
        """Evaluate against ``names`` (a dict of variables); ``clock`` feeds ``now()``.

        Returns a plain value (tuples, sets and lazy iterables become lists). Raises
        ExpressionError naming the expression on any failure.
        """
        run = _new_run(_Run)      # what _Run() makes, without a Python-level call
        run.work_left, run.limits, run.clock, run.sizes = (
            self._limits.max_work, self._limits, clock, {})
        env = names if names is not None else {}
        try:
            value = self._root(run, env)
            if type(value) in _PLAIN:
                return value
            return _to_plain(run, value)
        except ExpressionError as exc:
            detail = str(exc)
        except RecursionError:
            detail = "data nested too deeply"
        except MemoryError:
            detail = "out of memory; simplify the expression"
        except Exception as exc:  # noqa: BLE001 - every data error becomes one error type
            detail = "%s: %s" % (type(exc).__name__, exc)
        raise ExpressionError("Expression %s failed: %s" % (_describe(self.source), detail))

    def __repr__(self):
        return "CompiledExpression(%s)" % _describe(self.source)


def compile_expression(source, limits=DEFAULT_LIMITS):
    """Parse and validate ``source`` once (cached); raises ExpressionError if not allowed."""
    if limits is DEFAULT_LIMITS:
        # Hashing the frozen Limits for the LRU key costs more than the lookup itself.
        compiled = _DEFAULT_COMPILED.get(source) if type(source) is str else None
        if compiled is None:
            if len(_DEFAULT_COMPILED) >= _MAX_DEFAULT_COMPILED:
                _DEFAULT_COMPILED.clear()
            compiled = _DEFAULT_COMPILED[source] = _compile_checked(source, limits)
        return compiled
    return _compile_checked(source, limits)


_DEFAULT_COMPILED = {}
_MAX_DEFAULT_COMPILED = 2048


def _compile_checked(source, limits):
    if not isinstance(source, str):
        raise ExpressionError("An expression must be a string, got a %s" % _type_name(source))
    return _compile_cached(source, limits)


@lru_cache(maxsize=2048)
def _compile_cached(source, limits):
    try:
        tree = _parse(source, limits)
        names = _validate(tree, limits)
        root = _Compiler().compile(tree)
    except ExpressionError as exc:
        detail = str(exc)
    except RecursionError:
        detail = "nested too deeply"
    else:
        return CompiledExpression(source, root, names, limits)
    raise ExpressionError("Expression %s is not allowed: %s. An expression is one "
                          "Python-style expression over data: no statements, lambdas, "
                          "assignments, or names starting with '_'" % (_describe(source), detail))


def evaluate(source, names=None, *, clock=None, limits=DEFAULT_LIMITS):
    """Evaluate the expression ``source`` against ``names``; see CompiledExpression."""
    return compile_expression(source, limits).evaluate(names, clock=clock)
