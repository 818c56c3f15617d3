"""The component type catalogue: the one list of stage types fm-edge knows.

Names are the reference registry names (snake_case). The 54 entries are the 41 types the
reference registers plus the 13 it implements but never registers (flowmason-semantics §4).
Documents may also spell a type with hyphens (``json-transform``, as the gallery templates
do) or use ``synthesizer``, which the reference lists but never implemented; both resolve to
the canonical name here so the reference's "component not found" failures go away.

Some types need something an edge device does not have (a database driver, pandas, an
audio provider, a vector store...). They stay *known*, so a document using them gets the
precise answer "not available on this device" instead of "unknown type".

The executor's component registry implements every known type that is available; this
module is the list it is checked against.
"""

import difflib
from typing import Dict, List, NamedTuple, Optional, Tuple

# Categories. "llm" covers the nodes backed by a model (text LLM, speech, document AI,
# embeddings); needs_llm says which of them need the *text* LLM. "control" means the type
# returns a directive the executor must act on (skip branches, run a loop body...); plain
# operators that merely *sound* like control flow (switch_router, break_loop, retry...)
# are "operator", as in the reference (§4.4).
LLM = "llm"
OPERATOR = "operator"
CONTROL = "control"
CATEGORIES = (LLM, OPERATOR, CONTROL)


class ComponentType(NamedTuple):
    """One stage type: what it is, what it needs, and how long it may run by default."""

    name: str
    category: str
    needs_llm: bool            # needs a text LLM for its real behaviour
    default_timeout_ms: int    # per-attempt limit when the stage sets no timeout_ms (§1.9)
    lacks: Optional[str]       # what this device lacks to run it; None when it can run


def _entry(name, category, timeout_s, needs_llm=False, lacks=None):
    return ComponentType(name, category, needs_llm, int(timeout_s * 1000), lacks)


# What the unavailable types lack, worded to follow "needs ...".
_SQL_ENGINE = "an embedded SQL engine (DuckDB) and pandas"
_PANDAS = "the pandas library"
_DB_DRIVER = "a {} driver and a reachable database server"
_AUDIO = "an audio (speech) provider"
_DOCUMENT_AI = "a document-AI provider"
_VECTOR_STORE = "an embedding provider and a vector database"
_MCP = "the MCP client library"
_CALLABLES = "Python callables as tasks; run stages in parallel with depends_on instead"

_ENTRIES = (
    # Core LLM nodes (§4.1). embedder has a deterministic fallback but is still an LLM node.
    _entry("generator", LLM, 120, needs_llm=True),
    _entry("critic", LLM, 60, needs_llm=True),
    _entry("improver", LLM, 120, needs_llm=True),
    _entry("selector", LLM, 60, needs_llm=True),
    _entry("combiner", LLM, 120, needs_llm=True),
    _entry("analyzer", LLM, 60, needs_llm=True),
    _entry("chat", LLM, 90, needs_llm=True),
    _entry("rewriter", LLM, 90, needs_llm=True),
    _entry("summarizer", LLM, 90, needs_llm=True),
    _entry("translator", LLM, 90, needs_llm=True),
    _entry("embedder", LLM, 30, needs_llm=True),
    # Model-backed nodes the reference never registers (§4.2). compliance_evaluator only
    # needs the text LLM; the others need providers no edge device has.
    _entry("compliance_evaluator", LLM, 60, needs_llm=True),
    _entry("knowledge_query", LLM, 60, needs_llm=True, lacks=_VECTOR_STORE),
    _entry("transcriber", LLM, 300, lacks=_AUDIO),
    _entry("text_to_speech", LLM, 120, lacks=_AUDIO),
    _entry("document_reader", LLM, 180, lacks=_DOCUMENT_AI),
    _entry("form_extractor", LLM, 120, lacks=_DOCUMENT_AI),
    _entry("retriever", LLM, 30, lacks=_VECTOR_STORE),
    _entry("policy_lookup", LLM, 60, lacks=_VECTOR_STORE),
    # Core operators (§4.3).
    _entry("json_transform", OPERATOR, 10),
    _entry("http_request", OPERATOR, 60),
    _entry("filter", OPERATOR, 5),
    _entry("logger", OPERATOR, 5),
    _entry("loop", OPERATOR, 10),
    _entry("schema_validate", OPERATOR, 10),
    _entry("variable_set", OPERATOR, 5),
    _entry("output_router", OPERATOR, 120),
    _entry("error_router", OPERATOR, 60),
    _entry("rule_checker", OPERATOR, 10),
    # Control flow with executor support (§4.4.1-4.4.6).
    _entry("conditional", CONTROL, 5),
    _entry("router", CONTROL, 5),
    _entry("foreach", CONTROL, 300),
    _entry("trycatch", CONTROL, 120),
    _entry("return", CONTROL, 5),
    _entry("subpipeline", CONTROL, 120),
    # Plain operators from the control-flow package (§4.4.7-4.4.9).
    _entry("switch_router", OPERATOR, 5),
    _entry("break_loop", OPERATOR, 1),
    _entry("continue_loop", OPERATOR, 1),
    _entry("retry", OPERATOR, 300),
    _entry("timeout", OPERATOR, 300),
    _entry("parallel", OPERATOR, 300, lacks=_CALLABLES),
    # Transformers (§4.5). aggregate/join/filter_transformer have stdlib equivalents.
    _entry("aggregate", OPERATOR, 60),
    _entry("join", OPERATOR, 60),
    _entry("filter_transformer", OPERATOR, 60),
    _entry("sql", OPERATOR, 60, lacks=_SQL_ENGINE),
    _entry("pandas", OPERATOR, 60, lacks=_PANDAS),
    # Connectors (§4.6) and MCP (§4.7).
    _entry("local_file", OPERATOR, 60),
    _entry("echo_connector", OPERATOR, 60),
    _entry("postgres", OPERATOR, 60, lacks=_DB_DRIVER.format("PostgreSQL (asyncpg)")),
    _entry("mongodb", OPERATOR, 60, lacks=_DB_DRIVER.format("MongoDB (motor)")),
    _entry("redis", OPERATOR, 30, lacks=_DB_DRIVER.format("Redis")),
    _entry("s3", OPERATOR, 60, lacks="an S3 client library (aioboto3) and network access"),
    _entry("mcp_tool_call", OPERATOR, 30, lacks=_MCP),
    _entry("mcp_list_tools", OPERATOR, 30, lacks=_MCP),
)

_BY_NAME: Dict[str, ComponentType] = {entry.name: entry for entry in _ENTRIES}

# Names that are not just a re-spelling of a canonical name. `synthesizer` appears in the
# reference's Studio catalogue and in 4 gallery templates; its fields are combiner's.
_EXTRA_ALIASES = {"synthesizer": "combiner"}


def _lookup_key(name):
    # Hyphens, spaces and case are spelling, not meaning: json-transform, JSON_Transform
    # and json_transform are the same type.
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def canonical_type(name) -> Optional[str]:
    """The canonical type name for ``name`` (an alias or a re-spelling), or None."""
    if not isinstance(name, str):
        return None
    key = _lookup_key(name)
    key = _EXTRA_ALIASES.get(key, key)
    return key if key in _BY_NAME else None


def component_info(name) -> Optional[ComponentType]:
    """The catalogue entry for ``name`` (canonical or alias), or None when unknown."""
    canonical = canonical_type(name)
    return _BY_NAME[canonical] if canonical else None


def known_types() -> List[str]:
    """Every canonical type name, sorted (available or not)."""
    return sorted(_BY_NAME)


def available_types() -> List[str]:
    """The canonical type names this device can run, sorted."""
    return sorted(entry.name for entry in _ENTRIES if entry.lacks is None)


def aliases() -> Dict[str, str]:
    """Every accepted spelling that differs from its canonical name → canonical name."""
    table = {name.replace("_", "-"): name for name in _BY_NAME if "_" in name}
    table.update(_EXTRA_ALIASES)
    return dict(sorted(table.items()))


def is_unavailable(name) -> bool:
    """True when ``name`` is a known type that needs something this device lacks."""
    return unavailable_reason(name) is not None


def unavailable_reason(name) -> Optional[str]:
    """What this device lacks to run ``name``; None when it can run (or is unknown)."""
    entry = component_info(name)
    return entry.lacks if entry else None


def needs_llm(name) -> bool:
    """True when ``name`` is a known type that needs a text LLM."""
    entry = component_info(name)
    return bool(entry and entry.needs_llm)


def category(name) -> Optional[str]:
    """``llm``, ``operator`` or ``control`` for a known type; None when unknown."""
    entry = component_info(name)
    return entry.category if entry else None


def is_control_flow(name) -> bool:
    """True when the executor must act on the type's directive (skip, loop, try...)."""
    return category(name) == CONTROL


def default_timeout_ms(name) -> Optional[int]:
    """The per-attempt timeout a stage of this type gets when it sets no timeout_ms."""
    entry = component_info(name)
    return entry.default_timeout_ms if entry else None


def closest_types(name, limit=3) -> Tuple[str, ...]:
    """Known names (aliases included) that look like ``name``, best first, for 'did you mean'."""
    if not isinstance(name, str):
        return ()
    candidates = list(_BY_NAME) + list(_EXTRA_ALIASES)
    matches = difflib.get_close_matches(_lookup_key(name), candidates, n=limit, cutoff=0.6)
    return tuple(matches)
