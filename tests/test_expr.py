"""The safe expression language (fmedge/pipeline/expr.py).

Grammar and semantics: flowmason-semantics.md §2.8 (with the comprehension-scoping bug
fixed and dict keys readable with dot access, design.md §5). Hardening: reliability.md
§3.8 — every escape and every resource bomb must end in ExpressionError.
"""

import datetime

import pytest

from fmedge.errors import ExpressionError
from fmedge.pipeline.expr import DEFAULT_LIMITS, Limits, compile_expression, evaluate

NAMES = {
    "input": {"items": [3, 1, 2], "mode": None, "name": "Ada", "count": 5,
              "customer": {"tier": "gold"}},
    "data": [{"name": "a", "healthy": True, "ms": 10}, {"name": "b", "healthy": False, "ms": 30}],
    "t": 2,
    "s": "  Hello, World  ",
    "d": {"a": 1, "b": 2},
}


def ev(source, names=None, **kwargs):
    return evaluate(source, NAMES if names is None else names, **kwargs)


# ---------------------------------------------------------------------------------------
# Grammar


@pytest.mark.parametrize("source, expected", [
    ("1 + 2 * 3", 7),
    ("7 // 2, 7 % 3, 2 ** 10, 7 / 2", [3, 1, 1024, 3.5]),
    ("-t, +t, ~t, not t", [-2, 2, -3, False]),
    ("6 & 3, 6 | 3, 6 ^ 3, 1 << 4, 64 >> 2", [2, 7, 5, 16, 16]),
    ("'ab' + 'cd'", "abcd"),
    ("[1, 2] + [3]", [1, 2, 3]),
    ("'-' * 3", "---"),
    ("1 < t < 3", True),
    ("1 < t > 3", False),
    ("t == 2 != 3", True),
    ("input.mode is None", True),
    ("input.name is not None", True),
    ("2 in input.items", True),
    ("9 not in input.items", True),
    ("'a' in d", True),
    ("'World' in s", True),
    ("'yes' if t > 1 else 'no'", "yes"),
    ("[1, 'x', None, True]", [1, "x", None, True]),
    ("{'k': t, 'n': [t]}", {"k": 2, "n": [2]}),
    ("{**d, 'c': 3}", {"a": 1, "b": 2, "c": 3}),
    ("[*input.items, 4]", [3, 1, 2, 4]),
    ("(1, 2)", [1, 2]),
    ("{3, 1, 2}", [1, 2, 3]),
    ("input.items[0]", 3),
    ("input.items[-1]", 2),
    ("input.items[::-1]", [2, 1, 3]),
    ("input.items[1:]", [1, 2]),
    ("s.strip()[:5]", "Hello"),
    ("f'{t} items'", "2 items"),
    ("f'{t:>4}|{t:03d}|{3.14159:.2f}|{input.name!r}'", "   2|002|3.14|'Ada'"),
    ("True and False or None", None),
])
def test_grammar(source, expected):
    assert ev(source) == expected


def test_boolean_operators_return_operands_like_python():
    assert ev("input.mode or 'auto'") == "auto"
    assert ev("input.name and input.count") == 5
    assert ev("0 or '' or []") == []
    assert ev("'x' and 0") == 0


def test_boolean_operators_short_circuit():
    # The right-hand sides would fail if they were evaluated.
    assert ev("False and undefined_name") is False
    assert ev("True or 1 / 0") is True
    assert ev("input.mode and input.mode.lower()") is None


def test_chained_comparison_short_circuits_and_evaluates_each_operand_once():
    assert ev("1 > 2 < 1 / 0") is False
    assert ev("1 < 2 < 3 < 4") is True


def test_conditional_expression_evaluates_only_the_chosen_branch():
    assert ev("'safe' if True else 1 / 0") == "safe"


# ---------------------------------------------------------------------------------------
# Dict keys as attributes, and missing values


def test_dict_keys_read_with_dot_access():
    assert ev("input.customer.tier") == "gold"
    assert ev("data[1].name") == "b"


def test_a_key_wins_over_a_method_of_the_same_name():
    assert ev("input.items") == [3, 1, 2]
    assert ev("len(input.items)") == 3
    assert ev("d.items()") == [("a", 1), ("b", 2)]   # no key 'items' in d: the method


def test_a_missing_key_reads_as_none():
    assert ev("input.missing") is None
    assert ev("input.missing or 'default'") == "default"
    assert ev("d['zzz']") is None
    assert ev("d.get('zzz', 7)") == 7


def test_reading_from_none_gives_none():
    assert ev("input.missing.deeper.still") is None
    assert ev("input.missing[0]") is None
    assert ev("input.customer.name or 'friend'") == "friend"


@pytest.mark.parametrize("source, message", [
    ("input.missing.lower()", "cannot call null"),
    ("input.items[10]", "index 10 out of range for a list of length 3"),
    ("[a for a, b in [1, 2]]", "cannot unpack a int into 2 loop variables"),
    ("[x for x in input.missing]", "cannot loop over null"),
    ("sum(input.missing)", "cannot iterate over null"),
    ("1 in input.missing", "cannot test membership in null"),
    ("t()", "a int is not callable"),
    ("len(1, 2)", r"len\(\)"),
    ("input.name.upper", "evaluates to a function; call it with"),
    ("1 / 0", r"'1 / 0' failed: ZeroDivisionError: division by zero"),
    ("math.sqrt(-1)", "math domain error"),
    ("math.exp(100000)", "OverflowError"),
    ("t.real", "a int has no attribute 'real'"),
    ("t[0]", "a int cannot be indexed"),
    ("type(t)", "'type' is not available: use isinstance"),
    ("format(t, 'x')", "'format' is not available: use an f-string"),
])
def test_errors_say_what_went_wrong(source, message):
    with pytest.raises(ExpressionError, match=message):
        ev(source)


def test_an_undefined_name_lists_the_available_names():
    with pytest.raises(ExpressionError) as caught:
        ev("inptu.items")
    message = str(caught.value)
    assert "'inptu.items'" in message
    assert "name 'inptu' is not defined" in message
    assert "input" in message and "data" in message


def test_names_shadow_builtins():
    assert evaluate("len", {"len": 3}) == 3


def test_evaluate_without_names():
    assert evaluate("1 + 1") == 2


# ---------------------------------------------------------------------------------------
# Comprehensions: normal scoping (the reference's Python <= 3.11 bug is fixed)


def test_comprehensions_see_outer_names_and_builtins():
    assert ev("[x for x in input.items if x > t]") == [3]
    assert ev("sum([len(s) for s in ['ab', 'c']])") == 3
    assert ev("[r['name'] for r in data if r.get('healthy', False)]") == ["a"]


def test_loop_variables_do_not_leak():
    with pytest.raises(ExpressionError, match="name 'x' is not defined"):
        ev("[[x for x in input.items], x]")
    assert evaluate("[[x for x in [1, 2]], x]", {"x": "outer"}) == [[1, 2], "outer"]


def test_comprehension_kinds():
    assert ev("{k: v * 10 for k, v in d.items()}") == {"a": 10, "b": 20}
    assert ev("{x % 2 for x in input.items}") == [0, 1]
    assert ev("sum(r['ms'] for r in data) / len(data)") == 20.0
    assert ev("(x * 2 for x in input.items)") == [6, 2, 4]
    assert ev("[y for x in [[1, 2], [3]] for y in x if y != 2]") == [1, 3]
    assert ev("[[i, c] for i, c in enumerate('ab')]") == [[0, "a"], [1, "b"]]
    assert ev("[x for _ in range(2) for x in 'ab']") == ["a", "b", "a", "b"]


def test_gallery_style_expressions():
    assert ev("len([r for r in data if not r.get('healthy', True)])") == 1
    assert ev("all(r.get('healthy', False) for r in data)") is False
    assert ev("sum([r.get('ms', 0) for r in data]) / len(data) if data else 0") == 20.0
    assert ev("'critical' if len(data) >= 3 else ('high' if len(data) >= 2 else 'medium')") \
        == "high"
    invoices = {"data": {"invoices": [{"amount": 5, "status": "unpaid"},
                                      {"amount": 7, "status": "paid"}]}}
    assert evaluate("sum([i.amount for i in data.invoices if i.status == 'unpaid'])",
                    invoices) == 5


# ---------------------------------------------------------------------------------------
# Functions


@pytest.mark.parametrize("source, expected", [
    ("len('abc')", 3),
    ("str(12)", "12"),
    ("int('42'), int(' 7 '), int(3.9), int('ff', 16)", [42, 7, 3, 255]),
    ("float('0.5') + float(1)", 1.5),
    ("bool(''), bool('x')", [False, True]),
    ("abs(-3)", 3),
    ("min(input.items), max(input.items), min(4, 9), max([], default=0)", [1, 3, 4, 0]),
    ("max(['aa', 'b'], key=len)", "aa"),
    ("sum(input.items), sum([0.5, 0.5], 1)", [6, 2.0]),
    ("round(2.567, 2), round(2.5)", [2.57, 2]),
    ("sorted(input.items), sorted(input.items, reverse=True)", [[1, 2, 3], [3, 2, 1]]),
    ("sorted(['bb', 'a'], key=len)", ["a", "bb"]),
    ("reversed(input.items)", [2, 1, 3]),
    ("any([0, 1]), all([1, 0]), any([]), all([])", [True, False, False, True]),
    ("list('ab'), tuple([1]), set([1, 1])", [["a", "b"], (1,), {1}]),
    ("dict([('a', 1)]), dict(b=2)", [{"a": 1}, {"b": 2}]),
    ("list(enumerate('ab', 1))", [(1, "a"), (2, "b")]),
    ("list(zip('ab', [1, 2]))", [("a", 1), ("b", 2)]),
    ("range(3), list(range(1, 7, 2))", [range(0, 3), [1, 3, 5]]),
    ("list(map(str, input.items))", ["3", "1", "2"]),
    ("list(filter(None, [0, 1, '', 'x']))", [1, "x"]),
    ("pow(2, 10), pow(2, 10, 1000), divmod(7, 2)", [1024, 24, (3, 1)]),
    ("isinstance(t, int), isinstance('x', (int, str)), isinstance(d, list)",
     [True, True, False]),
    ("getattr(d, 'a'), getattr(d, 'zz', 'dflt'), hasattr(d, 'a'), hasattr('x', 'upper')",
     [1, "dflt", True, True]),
])
def test_whitelisted_functions(source, expected):
    assert ev(source) == expected


@pytest.mark.parametrize("source, expected", [
    ("s.strip()", "Hello, World"),
    ("s.lower().strip()", "hello, world"),
    ("s.upper().strip()", "HELLO, WORLD"),
    ("s.strip().split(', ')", ["Hello", "World"]),
    ("', '.join(['a', 'b'])", "a, b"),
    ("s.replace('World', 'There').strip()", "Hello, There"),
    ("s.strip().startswith('Hello'), s.strip().endswith('x')", [True, False]),
    ("'abc'.title(), 'a-b'.partition('-'), 'x'.center(5, '*')",
     ["Abc", ("a", "-", "b"), "**x**"]),
    ("'42'.isdigit(), 'ab'.count('a'), 'abc'.find('c')", [True, 1, 2]),
    ("'pre_x'.removeprefix('pre_')", "x"),
    ("list(d.keys()), list(d.values()), d.get('a')", [["a", "b"], [1, 2], 1]),
    ("[1, 2, 2].count(2), [1, 2].index(2)", [2, 1]),
    ("(2.0).is_integer()", True),
])
def test_safe_methods(source, expected):
    assert ev(source) == expected


def test_math_namespace_works_with_dot_and_subscript():
    assert ev("math.sqrt(16)") == 4.0
    assert ev("math['sqrt'](4)") == 2.0
    assert ev("math.floor(2.7), math.ceil(2.1), math.log10(100), math.pi > 3") == \
        [2, 3, 2.0, True]
    assert ev("math.isnan(math.nan), math.isinf(math.inf)") == [True, True]


def test_now_is_an_iso_utc_string_from_the_injected_clock():
    assert evaluate("now()", clock=lambda: 1700000000.25) == "2023-11-14T22:13:20.250+00:00"
    stamp = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    assert evaluate("now()", clock=lambda: stamp) == "2024-05-01T12:00:00.000+00:00"
    assert evaluate("now()").endswith("+00:00")


def test_time_time_reads_the_same_clock():
    assert evaluate("str(int(time.time()))", clock=lambda: 1700000000.9) == "1700000000"


# ---------------------------------------------------------------------------------------
# Results


def test_results_are_plain_json_friendly_values():
    assert ev("(1, 2)") == [1, 2]
    assert ev("{'b', 'a'}") == ["a", "b"]
    assert ev("range(3)") == [0, 1, 2]
    assert ev("d.keys()") == ["a", "b"]
    assert ev("(x for x in 'ab')") == ["a", "b"]


def test_data_passed_in_is_never_mutated():
    names = {"items": [3, 1, 2], "cfg": {"a": 1}}
    evaluate("sorted(items) + [4]", names)
    evaluate("{**cfg, 'b': 2}", names)
    assert names == {"items": [3, 1, 2], "cfg": {"a": 1}}
    with pytest.raises(ExpressionError, match="no attribute 'append'"):
        evaluate("items.append(4)", names)


def test_compiled_expressions_are_cached_and_reusable():
    compiled = compile_expression("x * 2")
    assert compile_expression("x * 2") is compiled
    assert compiled.evaluate({"x": 2}) == 4
    assert compiled.evaluate({"x": "ab"}) == "abab"
    assert compiled.names == frozenset({"x"})


def test_syntax_errors_are_reported_at_compile_time():
    with pytest.raises(ExpressionError, match="invalid syntax|column"):
        compile_expression("input.a b")


def test_a_source_that_is_not_a_string_is_refused():
    with pytest.raises(ExpressionError, match="must be a string"):
        compile_expression(["x"])




# ---------------------------------------------------------------------------------------
# Escapes: every one must be an ExpressionError (reliability.md §3.8)


@pytest.mark.parametrize("source", [
    "().__class__.__bases__",
    "().__class__.__bases__[0].__subclasses__()",
    "input.__class__",
    "d.__dict__",
    "getattr((), '__class__')",
    "getattr(getattr((), '__cl' + 'ass__'), '__bases__')",
    "hasattr((), '__class__')",
    "'{0.__class__}'.format(t)",
    "'{0.__class__.__mro__}'.format(t)",
    "'{x}'.format_map(d)",
    "str.format('{0}', 1)",
    "str.__mro__",
    "f'{t.__class__}'",
    "f'{t:{t.__class__}}'",
    "type(t)",
    "type(t).__subclasses__()",
    "vars()",
    "vars(d)",
    "globals()",
    "locals()",
    "dir()",
    "__import__('os')",
    "__builtins__",
    "_x",
    "open('/etc/passwd')",
    "compile('1', 'f', 'eval')",
    "exec",
    "format(t, '>10')",
    "lambda: 1",
    "(lambda x: x)(1)",
    "(y := 1)",
    "[y := 1 for z in [1]]",
    "len.__self__",
    "math.sqrt.impl",
    "d.get.receiver",
    "(x for x in [1]).gi_frame",
    "input.items.append(1)",
    "d.update({'a': 2})",
    "d.pop('a')",
    "setattr(d, 'a', 1)",
    "b'bytes'",
    "1j",
    "...",
    "[1] @ [2]",
    "isinstance(1, t)",
])
def test_escape_attempts_raise_expression_error(source):
    with pytest.raises(ExpressionError):
        ev(source)


# ---------------------------------------------------------------------------------------
# Resource bombs: each must fail with a clear ExpressionError, not hang or allocate


@pytest.mark.parametrize("source, message", [
    ("10 ** 10 ** 7", "too large"),
    ("2 ** 100000", "too large"),
    ("pow(10, 10 ** 7)", "too large"),
    ("1 << 10 ** 9", "too large"),
    ("(10 ** 1000) * (10 ** 1000)", "too large"),
    ("'x' * 10 ** 10", "repetition"),
    ("[0] * 10 ** 10", "repetition"),
    ("10 ** 10 * 'x'", "repetition"),
    ("range(10 ** 12)", "range"),
    ("range(10 ** 100)", "range"),
    ("list(range(10 ** 7))", "range"),
    ("[x for x in range(10 ** 6) for y in range(10 ** 6)]", "budget"),
    ("sum(1 for x in range(10 ** 6) for y in range(10 ** 6))", "budget"),
    ("[[0] * 1000000] * 1000000", "budget"),
    ("str([[0] * 1000000] * 1000000)", "budget"),
    ("set([tuple(range(10 ** 5))] * 10 ** 5)", "budget"),
    ("[list(range(1000)) for i in range(100000)]", "budget"),
    ("f'{1:>400000000}'", "width"),
    ("f'{1.5:.99999999f}'", "width"),
    ("'%999999999d' % 1", "f-string"),
    ("'x'.center(10 ** 9)", "width"),
    ("'x'.ljust(10 ** 9)", "width"),
    ("('x' * 100000).replace('x', 'y' * 100000)", "replace"),
    ("('x' * 1000000 + 'y')", "concatenation"),
    ("'-'.join(['x' * 100000] * 100)", "join"),
    ("round(5, -10 ** 7)", "ndigits"),
    ("int('9' * 5000)", "too long"),
    ("sum([[1]] * 10, [])", "sum"),
])
def test_resource_bombs_fail_fast(source, message):
    with pytest.raises(ExpressionError, match=message):
        ev(source)


@pytest.mark.parametrize("source", [
    "(" * 1000 + "1" + ")" * 1000,
    "[" * 1000 + "]" * 1000,
    "{" * 1000 + "}" * 1000,
    "-" * 5000 + "1",
    "not " * 2000 + "1",
    "a" + ".b" * 4000,
    "a" + "[0]" * 3000,
    "1" + " + 1" * 2400,
    "f(" * 1000 + ")" * 1000,
    "x" * 20000,
])
def test_deeply_nested_or_huge_source_fails_cleanly(source):
    with pytest.raises(ExpressionError):
        evaluate(source, {"a": {}, "x": 1})


def test_limits_can_be_tightened():
    tight = Limits(max_work=1000)
    assert evaluate("sum(range(100))", limits=tight) == 4950
    with pytest.raises(ExpressionError, match="budget"):
        evaluate("sum(range(10000))", limits=tight)
    with pytest.raises(ExpressionError, match="too large"):
        evaluate("2 ** 100", limits=Limits(max_int_bits=64))
    assert DEFAULT_LIMITS.max_range >= 10 ** 6


def test_legitimate_work_on_thousands_of_records_fits_the_budget():
    records = [{"name": "svc%d" % i, "status": "up" if i % 3 else "down", "ms": i % 100}
               for i in range(10000)]
    result = evaluate("[{'name': r.get('name'), 'ok': r.get('status') == 'up'} "
                      "for r in data if r.ms < 90]", {"data": records})
    assert len(result) == 9000
    assert evaluate("sum(range(10 ** 6))") == 499999500000


def test_deeply_nested_data_fails_cleanly():
    nested = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(ExpressionError):
        evaluate("str(x)", {"x": nested})
