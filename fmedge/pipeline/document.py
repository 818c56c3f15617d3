"""Parse and validate FlowMason pipeline documents into ``Pipeline`` and ``Stage``.

Three dialects exist (flowmason-semantics §1.1) and all are read the same way:
canonical (``type`` + ``input_mapping``), Studio/gallery (``component_type`` + ``config``)
and project files (``component`` + ``config``). A stage's type is the first non-empty of
``type``, ``component_type``, ``component``; its parameters are
``{**input_mapping, **config}`` (``config`` wins on a shared key, as in the reference).

Everything the reference only discovers half-way through a run (unknown types, unknown or
cyclic dependencies, duplicate ids, bad timeouts) is refused here, before the document is
stored, with one message naming the pipeline, the stage, the field, the bad value and the
fix. Templates (``{{...}}``) are kept as written: they are resolved per run.
"""

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from fmedge.errors import PipelineValidationError
from fmedge.pipeline import catalog

# -- Limits (reference bounds unless the comment says otherwise) ------------------------
STAGE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")   # schema pattern; ids appear in paths
MAX_STAGE_ID_LENGTH = 128          # ids become keys in results and in `<id>_iter_<n>` names
TIMEOUT_MS_MIN = 100               # reference ComponentConfig: 100 <= timeout_ms <= 600000;
TIMEOUT_MS_MAX = 600000            # a smaller value is usually seconds written as ms
MAX_RETRIES_LIMIT = 10
# The reference wants initial_delay_ms >= 100 but its schema allows backoff_ms >= 0, and
# the runtime ignores backoff_ms: accept 0 so no schema-valid document is refused. The
# upper bound is ours: a delay past an hour is a unit mistake, not a policy.
RETRY_DELAY_MS_MAX = 3600000
MULTIPLIER_MIN, MULTIPLIER_MAX = 1.0, 5.0
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0
MAX_TOKENS_LIMIT = 128000          # generator's own bound
MAX_INHERITANCE_DEPTH = 32         # a deeper `extends` chain is a loop the ids did not show
MAX_PROBLEMS_IN_MESSAGE = 20       # the rest stay in the exception's `problems`
DEFAULT_VERSION = "1.0.0"          # what the reference loaders assume

ON_ERROR_VALUES = ("propagate", "continue")
STAGE_TYPE_KEYS = ("type", "component_type", "component")

# Control-flow inputs that name other stages (§4.4). Router `routes` is a map of lists and
# is handled on its own.
STAGE_LIST_FIELDS = {
    "conditional": ("true_branch_stages", "false_branch_stages"),
    "router": ("default_route",),
    "foreach": ("loop_stages",),
    "trycatch": ("try_stages", "catch_stages", "finally_stages"),
}

_MISSING = object()

Lookup = Callable[[str], Optional[dict]]


# -- The parsed shapes ------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """A stage's ``retry_config`` with the reference's runtime names and defaults (§1.8)."""

    max_retries: int = 3
    initial_delay_ms: int = 1000
    backoff_multiplier: float = 2.0
    max_delay_ms: int = 30000

    def delay_ms(self, retry_index: int) -> float:
        """Delay before retry ``retry_index`` (0-based), before the caller's jitter."""
        delay = self.initial_delay_ms * self.backoff_multiplier ** retry_index
        return min(delay, self.max_delay_ms)


@dataclass(frozen=True)
class Stage:
    """One stage, normalised from any dialect. ``inputs`` still holds raw templates."""

    id: str
    type: str                      # canonical catalogue name ("" only while invalid)
    declared_type: str             # as written: "json-transform", "synthesizer"...
    inputs: Dict[str, Any]
    depends_on: Tuple[str, ...] = ()
    name: Optional[str] = None
    description: Optional[str] = None
    on_error: str = "propagate"
    fallback_output: Any = None
    retry: Optional[RetryPolicy] = None
    timeout_ms: Optional[int] = None
    enabled: bool = True
    provider: Optional[str] = None
    model: Optional[str] = None
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    llm_settings: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict)

    @property
    def effective_timeout_ms(self) -> int:
        """The stage's own timeout, else its type's default (§1.9)."""
        if self.timeout_ms is not None:
            return self.timeout_ms
        return catalog.default_timeout_ms(self.type) or 60000

    @property
    def category(self) -> Optional[str]:
        return catalog.category(self.type)

    @property
    def needs_llm(self) -> bool:
        return catalog.needs_llm(self.type)


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline, inheritance already applied (``resolved``)."""

    id: str
    name: str
    version: str
    stages: Tuple[Stage, ...]
    description: Optional[str] = None
    output_stage_id: Optional[str] = None   # None: the executor picks the last stage run
    input_schema: Optional[Dict[str, Any]] = None
    output_schema: Optional[Dict[str, Any]] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    category: Optional[str] = None
    tags: Tuple[str, ...] = ()
    sample_input: Any = None                # `sample_input`, else the gallery's `example_input`
    extends: Optional[str] = None           # as written in the document
    abstract: bool = False                  # stored, listed, but never run
    warnings: Tuple[str, ...] = ()
    raw: Dict[str, Any] = field(default_factory=dict)       # the document as given
    resolved: Dict[str, Any] = field(default_factory=dict)  # after extends/overrides

    @property
    def stage_ids(self) -> Tuple[str, ...]:
        return tuple(stage.id for stage in self.stages)

    def stage(self, stage_id: str) -> Stage:
        """The stage with this id; KeyError when there is none."""
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(stage_id)


# -- Public functions -------------------------------------------------------------------

def parse_pipeline(doc, *, pipeline_id=None, lookup: Optional[Lookup] = None) -> Pipeline:
    """Validate ``doc`` and return the ``Pipeline``; PipelineValidationError when invalid.

    ``pipeline_id`` (e.g. the cache key) wins over the document's ``id`` and ``name``.
    ``lookup(ref)`` returns a stored document for an ``extends`` reference, or None.
    """
    report = _Report(_guess_pipeline_id(doc, pipeline_id))
    if not isinstance(doc, dict):
        report.add(None, "document", doc, "is not a JSON object",
                   'write the pipeline as one JSON object: {"name": ..., "stages": [...]}')
        report.raise_if_any()
    raw = copy.deepcopy(doc)
    _check_inheritance_fields(raw, report)
    report.raise_if_any()
    resolved, warnings = _resolve_inheritance(raw, report, lookup)
    pipeline = _build_pipeline(raw, resolved, pipeline_id, report, warnings)
    report.raise_if_any()
    # Warnings are returned, not logged: documents are parsed again on every run, and
    # `fm-edge add` is the place to show them once.
    return pipeline


def validate_document(doc, *, pipeline_id=None, lookup: Optional[Lookup] = None) -> Pipeline:
    """Raise PipelineValidationError when ``doc`` cannot be stored; else return it parsed."""
    return parse_pipeline(doc, pipeline_id=pipeline_id, lookup=lookup)


def topological_waves(pipeline: Pipeline) -> List[List[str]]:
    """Stage ids grouped in the reference's waves (§3.2), declaration order inside a wave.

    A stage is in wave k when its deepest dependency is in wave k-1, so every stage only
    ever sees completed ancestors; running the waves in order (or their concatenation one
    stage at a time) is a valid schedule.
    """
    deps = {stage.id: stage.depends_on for stage in pipeline.stages}
    level: Dict[str, int] = {}
    for stage_id in _dependency_order(pipeline.id, deps):
        level[stage_id] = 1 + max((level[dep] for dep in deps[stage_id]), default=-1)
    waves: List[List[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for stage in pipeline.stages:
        waves[level[stage.id]].append(stage.id)
    return waves


def canonical_json(doc) -> bytes:
    """The bytes a document is hashed and stored as: sorted keys, no spaces, UTF-8."""
    if isinstance(doc, Pipeline):
        doc = doc.raw
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: json.loads accepts lone "\ud800" escapes; hashing must not crash on them.
    return text.encode("utf-8", "surrogatepass")


def pipeline_sha256(doc) -> str:
    """Hex sha256 of ``canonical_json(doc)``: the version fingerprint and the sync ETag."""
    return hashlib.sha256(canonical_json(doc)).hexdigest()


# -- Problems: collected, then raised as one error --------------------------------------

class _Report:
    """Collects every problem found so one error can list them all."""

    def __init__(self, pipeline_id: str):
        self.pipeline_id = pipeline_id
        self.problems: List[Dict[str, Any]] = []

    def add(self, stage, field_name, value, what, fix):
        """Record one problem; ``stage`` is a stage label or None for the pipeline itself."""
        where = "pipeline {!r}".format(self.pipeline_id)
        if stage is not None:
            where += ", stage {}".format(stage)
        where += ", field {!r}".format(field_name)
        shown = "" if value is _MISSING else " (value {})".format(_show(value))
        message = "{}{}: {}. Fix: {}.".format(where, shown, what, fix)
        self.problems.append({
            "pipeline": self.pipeline_id, "stage": stage, "field": field_name,
            "value": None if value is _MISSING else value, "message": message,
        })

    def raise_if_any(self):
        if not self.problems:
            return
        lines = [problem["message"] for problem in self.problems]
        if len(lines) == 1:
            message = lines[0]
        else:
            shown = lines[:MAX_PROBLEMS_IN_MESSAGE]
            if len(lines) > len(shown):
                shown.append("... and {} more".format(len(lines) - len(shown)))
            message = "pipeline {!r} is invalid ({} problems):\n- {}".format(
                self.pipeline_id, len(lines), "\n- ".join(shown))
        error = PipelineValidationError(message)
        error.pipeline_id = self.pipeline_id
        error.problems = list(self.problems)
        raise error


def _show(value, limit=80):
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _stage_label(stage_id):
    return repr(stage_id)


def _index_label(index):
    return "stages[{}]".format(index)


def _guess_pipeline_id(doc, pipeline_id):
    if isinstance(pipeline_id, str) and pipeline_id:
        return pipeline_id
    if isinstance(doc, dict):
        for key in ("id", "name"):
            if isinstance(doc.get(key), str) and doc[key]:
                return doc[key]
    return "<unnamed>"


# -- Small typed readers ------------------------------------------------------------------

def _as_int(value) -> Optional[int]:
    """An int from an int or an integral float; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _optional_str(raw, key, label, report):
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    report.add(label, key, value, "must be a string", 'write it as a JSON string, or remove it')
    return None


def _optional_object(raw, key, label, report):
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    report.add(label, key, value, "must be a JSON object", "write it as {...}, or remove it")
    return None


def _is_template(value):
    return isinstance(value, str) and "{{" in value


# -- Inheritance (§1.12) ------------------------------------------------------------------

def _check_inheritance_fields(doc, report):
    extends = doc.get("extends")
    if extends is not None and not (isinstance(extends, str) and extends.strip()):
        report.add(None, "extends", extends, "must be a pipeline reference",
                   'write "extends": "<parent-id>" or "<parent-id>@<version>"')
    abstract = doc.get("abstract")
    if abstract is not None and not isinstance(abstract, bool):
        report.add(None, "abstract", abstract, "must be true or false", 'write "abstract": true')
    overrides = doc.get("overrides")
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        report.add(None, "overrides", overrides, "must be an object of stage id → changes",
                   'write "overrides": {"<stage-id>": {"input_mapping": {...}}}')
        return
    for stage_id, patch in overrides.items():
        if not isinstance(patch, dict):
            report.add(_stage_label(stage_id), "overrides", patch,
                       "an override must be a JSON object of stage fields",
                       'write {"input_mapping": {...}} or another partial stage')


def _resolve_inheritance(leaf, report, lookup):
    """The leaf merged onto its ancestors (base first) and the warnings of the merge."""
    warnings: List[str] = []
    if not leaf.get("extends"):
        if leaf.get("overrides"):
            warnings.append('"overrides" has no effect: the pipeline extends nothing')
        return leaf, warnings
    chain = [leaf]
    seen = _identity_keys(leaf, report.pipeline_id)
    names = [report.pipeline_id]
    while chain[-1].get("extends"):
        ref = chain[-1]["extends"]
        if not isinstance(ref, str):   # only a stored parent can get here (leaf checked)
            report.add(None, "extends", leaf.get("extends"),
                       "the ancestor {!r} has an invalid extends {}".format(
                           names[-1], _show(ref)),
                       "fix and re-add {!r}".format(names[-1]))
            report.raise_if_any()
        parent = _load_parent(ref, report, lookup, names[-1])
        keys = _identity_keys(parent, ref.partition("@")[0])
        names.append(ref)
        if keys & seen or len(chain) > MAX_INHERITANCE_DEPTH:
            what = "circular" if keys & seen else "deeper than {} levels".format(
                MAX_INHERITANCE_DEPTH)
            report.add(None, "extends", leaf.get("extends"),
                       "inheritance is {}: {}".format(what, " → ".join(names)),
                       "make one pipeline of the chain stop extending the others")
            report.raise_if_any()
        seen |= keys
        chain.append(parent)
    merged = chain[-1]
    for child in reversed(chain[:-1]):
        merged = _merge_two(merged, child, warnings)
    return merged, warnings


def _identity_keys(doc, fallback):
    """``name@version`` keys a document answers to; a repeat means a cycle."""
    version = doc.get("version") if isinstance(doc.get("version"), str) else DEFAULT_VERSION
    names = (doc.get("id"), doc.get("name"), fallback)
    return {"{}@{}".format(name, version) for name in names if isinstance(name, str) and name}


def _load_parent(ref, report, lookup, child_name):
    """The parent document for ``ref`` ("id" or "id@version"), or a raised problem."""
    base, _, version = ref.partition("@")
    found = _lookup(lookup, ref)
    if found is None and version:
        # A store keyed by id alone still answers "id@version" when the versions agree.
        found = _lookup(lookup, base)
        stored = found.get("version", DEFAULT_VERSION) if found is not None else version
        if stored != version:
            report.add(None, "extends", ref,
                       "{!r} asks for {!r} version {} but this device has version {}".format(
                           child_name, base, version, stored),
                       "add version {} of {!r}, or extend {!r}".format(version, base, base))
            report.raise_if_any()
    if found is None:
        report.add(None, "extends", ref,
                   "{!r} extends {!r}, which is not on this device".format(child_name, ref),
                   "add the parent pipeline {!r} first, then this one".format(base))
        report.raise_if_any()
    return copy.deepcopy(found)


def _lookup(lookup, ref):
    found = lookup(ref) if lookup is not None else None
    found = getattr(found, "raw", found)   # a Pipeline from the cache is fine too
    return found if isinstance(found, dict) else None


def _merge_two(parent, child, warnings):
    """One inheritance step, parent then child (flowmason PipelineMerger rules)."""
    merged = {key: value for key, value in parent.items()
              if key not in ("id", "name", "version", "extends", "overrides", "abstract")}
    merged.update({key: value for key, value in child.items()
                   if key not in ("extends", "overrides")})
    merged["abstract"] = child.get("abstract") is True
    description = child.get("description") or parent.get("description")
    if description is not None:
        merged["description"] = description
    merged["stages"] = _merge_stages(parent, child, warnings)
    if "compositions" in parent or "compositions" in child:
        merged["compositions"] = _merge_by_id(parent.get("compositions"),
                                              child.get("compositions"))
    for key in ("input_schema", "output_schema"):
        if key in parent or key in child:
            merged[key] = _merge_schema(parent.get(key), child.get(key))
    for key in ("category", "output_stage_id"):
        value = child.get(key) or parent.get(key)
        if value is not None:
            merged[key] = value
    tags = _ordered_union(parent.get("tags"), child.get("tags"))
    if tags is not None:
        merged["tags"] = tags
    return merged


def _merge_stages(parent, child, warnings):
    parent_stages = _stage_list(parent)
    child_stages = _stage_list(child)
    child_ids = {_raw_id(stage) for stage in child_stages} - {None}
    patches = child.get("overrides")
    patches = patches if isinstance(patches, dict) else {}
    by_id = {_raw_id(stage): stage for stage in parent_stages if _raw_id(stage)}
    for stage_id, patch in patches.items():
        if stage_id not in by_id:
            warnings.append("override for stage {!r} ignored: the parent has no such "
                            "stage".format(stage_id))
        elif not isinstance(patch, dict):
            continue   # reported by _check_inheritance_fields for the document being added
        elif stage_id in child_ids:
            warnings.append("override for stage {!r} has no effect: this pipeline "
                            "redefines the whole stage".format(stage_id))
        else:
            by_id[stage_id] = _deep_merge(_normalised_stage(by_id[stage_id]),
                                          _normalised_stage(patch))
    return _merge_by_id([by_id.get(_raw_id(stage), stage) for stage in parent_stages],
                        child_stages)


def _raw_id(item):
    """A raw stage's (or composition's) string id, None when it has none usable."""
    stage_id = item.get("id") if isinstance(item, dict) else None
    return stage_id if isinstance(stage_id, str) and stage_id else None


def _stage_list(doc):
    stages = doc.get("stages")
    return stages if isinstance(stages, list) else []


def _normalised_stage(stage):
    """A stage dict in canonical form (``type`` + merged ``input_mapping``).

    Overrides are applied to this form so an override of ``input_mapping.x`` is kept even
    when the parent stage wrote ``config`` (the reference loses it, semantics §6 item 27).
    """
    out = dict(stage)
    type_key = _type_key(stage)
    for key in STAGE_TYPE_KEYS:
        out.pop(key, None)
    if type_key is not None:
        out["type"] = stage[type_key]
    mapping, config = stage.get("input_mapping"), stage.get("config")
    if isinstance(mapping or {}, dict) and isinstance(config or {}, dict):
        out.pop("config", None)
        if mapping is not None or config is not None:
            out["input_mapping"] = dict(mapping or {}, **(config or {}))
    return out


def _deep_merge(base, patch):
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(result.get(key), dict) and isinstance(value, dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_by_id(parent_items, child_items):
    """Parent items in parent order, each replaced wholesale by the child's item with the
    same id, then the child's new items in child order."""
    if not isinstance(parent_items, list) or not isinstance(child_items, list):
        return child_items if child_items is not None else parent_items
    child_by_id = {_raw_id(item): item for item in child_items if _raw_id(item)}
    merged = [child_by_id.get(_raw_id(item), item) for item in parent_items]
    parent_ids = {_raw_id(item) for item in parent_items} - {None}
    merged.extend(item for item in child_items
                  if _raw_id(item) is None or _raw_id(item) not in parent_ids)
    return merged


def _merge_schema(parent_schema, child_schema):
    if not isinstance(parent_schema, dict) or not isinstance(child_schema, dict):
        return child_schema if child_schema is not None else parent_schema
    merged = copy.deepcopy(parent_schema)
    if isinstance(child_schema.get("properties"), dict):
        properties = merged.get("properties")
        merged["properties"] = dict(properties if isinstance(properties, dict) else {},
                                    **child_schema["properties"])
    if "required" in child_schema:
        merged["required"] = _ordered_union(merged.get("required"), child_schema["required"])
    if "type" in child_schema:
        merged["type"] = child_schema["type"]
    return merged


def _ordered_union(first, second):
    """Union of two lists, first-seen order kept (the reference loses the order)."""
    if not isinstance(first, list) or not isinstance(second, list):
        return second if second is not None else first
    out = []
    for item in first + second:
        if item not in out:
            out.append(item)
    return out


# -- Building the pipeline ------------------------------------------------------------------

def _build_pipeline(raw, resolved, pipeline_id, report, warnings):
    doc_id = _optional_str(resolved, "id", None, report)
    name = _optional_str(resolved, "name", None, report)
    identity = (pipeline_id if isinstance(pipeline_id, str) else None) or doc_id or name
    if not identity:
        report.add(None, "id", _MISSING, "the pipeline has no id and no name",
                   'add "id": "<pipeline-id>" (or "name") to the document')
    stages = _parse_stages(resolved, report)
    _check_graph(stages, report, warnings)
    warnings.extend(_ignored_field_warnings(stages))
    output_stage_id = _output_stage_id(resolved, stages, report)
    tags = _tags(resolved, report)
    return Pipeline(
        id=identity or "", name=name or identity or "",
        version=_version(resolved, report),
        stages=tuple(stages),
        description=_optional_str(resolved, "description", None, report),
        output_stage_id=output_stage_id,
        input_schema=_schema(resolved, "input_schema", report),
        output_schema=_schema(resolved, "output_schema", report),
        metadata=_optional_object(resolved, "metadata", None, report) or {},
        category=_optional_str(resolved, "category", None, report),
        tags=tags,
        sample_input=resolved.get("sample_input", resolved.get("example_input")),
        extends=raw.get("extends") or None,
        abstract=raw.get("abstract") is True,
        warnings=tuple(dict.fromkeys(warnings)),   # one line per distinct warning
        raw=raw,
        resolved=resolved,
    )


def _ignored_field_warnings(stages):
    # The gallery's `error_handling` block looks like it configures retries but is not a
    # FlowMason field: the reference ignores it, and so do we (its max_retries of 30 is
    # outside retry_config's bounds anyway). Say so rather than let it look honoured.
    for stage in stages:
        if "error_handling" in stage.raw:
            yield ("stage {!r}: 'error_handling' is not a FlowMason stage field and is "
                   "ignored; use 'retry_config' and 'on_error'".format(stage.id))


def _version(doc, report):
    version = doc.get("version")
    if version is None:
        return DEFAULT_VERSION
    if isinstance(version, str) and version.strip():
        return version
    report.add(None, "version", version, "must be a non-empty string",
               'write it as a string such as "1.0.0"')
    return DEFAULT_VERSION


def _tags(doc, report):
    tags = doc.get("tags")
    if tags is None:
        return ()
    if isinstance(tags, list) and all(isinstance(tag, str) for tag in tags):
        return tuple(tags)
    report.add(None, "tags", tags, "must be a list of strings", 'write ["tag-a", "tag-b"]')
    return ()


def _schema(doc, key, report):
    schema = _optional_object(doc, key, None, report)
    if schema is None:
        return None
    properties = schema.get("properties")
    if properties is not None and not isinstance(properties, dict):
        report.add(None, key + ".properties", properties, "must be a JSON object",
                   'write {"<input-name>": {"type": "string"}, ...}')
    required = schema.get("required")
    if required is not None and not (
            isinstance(required, list) and all(isinstance(item, str) for item in required)):
        report.add(None, key + ".required", required, "must be a list of property names",
                   'write ["<input-name>", ...]')
    return schema


def _output_stage_id(doc, stages, report):
    value = doc.get("output_stage_id")
    if value is None or value == "":
        return None
    ids = [stage.id for stage in stages]
    if isinstance(value, str) and value in ids:
        return value
    report.add(None, "output_stage_id", value, "names no stage of this pipeline",
               "use one of: {}, or remove it to return the last stage".format(_listing(ids)))
    return None


def _listing(items, limit=30):
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (", ..." if len(items) > limit else "")


# -- Stages -------------------------------------------------------------------------------

def _parse_stages(doc, report) -> List[Stage]:
    value = doc.get("stages", _MISSING)
    if value is _MISSING or value is None:
        report.add(None, "stages", _MISSING, "is missing",
                   'add "stages": [{"id": "...", "type": "generator", ...}]')
        return []
    if not isinstance(value, list) or not value:
        what = "is empty" if isinstance(value, list) else "must be a list of stages"
        report.add(None, "stages", value, what, "give the pipeline at least one stage")
        return []
    parsed = (_parse_stage(raw, index, report) for index, raw in enumerate(value))
    return [stage for stage in parsed if stage is not None]


def _parse_stage(raw, index, report) -> Optional[Stage]:
    """The Stage for one raw stage; None when it has no usable id (graph checks skip it)."""
    if not isinstance(raw, dict):
        report.add(_index_label(index), "stages[{}]".format(index), raw,
                   "a stage must be a JSON object", 'write {"id": "...", "type": "...", ...}')
        return None
    stage_id = _stage_id(raw, index, report)
    label = _stage_label(stage_id) if stage_id else _index_label(index)
    declared, canonical = _stage_type(raw, label, report)
    llm_settings = _optional_object(raw, "llm_settings", label, report) or {}
    stage = Stage(
        id=stage_id or "", type=canonical or "", declared_type=declared or "",
        inputs=_stage_inputs(raw, label, report),
        depends_on=_depends_on(raw, label, report),
        name=_optional_str(raw, "name", label, report),
        description=_optional_str(raw, "description", label, report),
        on_error=_on_error(raw, label, report),
        fallback_output=raw.get("fallback_output"),
        retry=_retry(raw, label, report),
        timeout_ms=_timeout_ms(raw, label, report),
        enabled=_enabled(raw, label, report),
        provider=_optional_str(raw, "provider", label, report)
        or _setting_str(llm_settings, "provider"),
        model=_optional_str(raw, "model", label, report) or _setting_str(llm_settings, "model"),
        temperature=_temperature(llm_settings, label, report),
        max_tokens=_max_tokens(llm_settings, label, report),
        llm_settings=llm_settings,
        raw=raw,
    )
    return stage if stage_id else None


def _setting_str(settings, key):
    value = settings.get(key)
    return value if isinstance(value, str) and value else None


def _stage_id(raw, index, report):
    value = raw.get("id", _MISSING)
    label = _index_label(index)
    if value is _MISSING or value is None or value == "":
        report.add(label, "id", value, "the stage has no id",
                   'add "id": "<stage-id>" (letters, digits, "_" and "-")')
        return None
    if not isinstance(value, str) or not STAGE_ID_PATTERN.match(value):
        report.add(label, "id", value, "is not a valid stage id",
                   'use letters, digits, "_" and "-" only, e.g. "draft-1"')
        return None
    if len(value) > MAX_STAGE_ID_LENGTH:
        report.add(label, "id", value, "is longer than {} characters".format(
            MAX_STAGE_ID_LENGTH), "use a shorter id")
        return None
    return value


def _type_key(raw):
    """The key the stage's type is read from: first non-empty of type/component_type/component."""
    return next((key for key in STAGE_TYPE_KEYS if raw.get(key) not in (None, "")), None)


def _stage_type(raw, label, report):
    """(declared type, canonical type or None) with problems for unknown/unavailable types."""
    key = _type_key(raw)
    if key is None:
        report.add(label, "type", _MISSING, "the stage has no component type",
                   'add "type": "<component type>", e.g. "generator"')
        return None, None
    declared = raw[key]
    if not isinstance(declared, str):
        report.add(label, key, declared, "must be a string naming a component type",
                   'write e.g. "{}": "generator"'.format(key))
        return None, None
    canonical = catalog.canonical_type(declared)
    if canonical is None:
        report.add(label, key, declared, "unknown component type {!r}".format(declared),
                   _unknown_type_fix(declared))
        return declared, None
    lacks = catalog.unavailable_reason(canonical)
    if lacks:
        report.add(label, key, declared,
                   "component type {!r} is not available on this device: it needs {}".format(
                       canonical, lacks),
                   "run this pipeline where that exists (FlowMason Studio), or replace the "
                   "stage with a type this device has")
    return declared, canonical


def _unknown_type_fix(declared):
    close = catalog.closest_types(declared)
    hint = "did you mean {}? ".format(" or ".join(repr(c) for c in close)) if close else ""
    return "{}use one of the known types: {} (hyphenated spellings such as " \
           "'json-transform' are accepted too)".format(hint, ", ".join(catalog.known_types()))


def _stage_inputs(raw, label, report) -> Dict[str, Any]:
    """``{**input_mapping, **config}``: config wins on a shared key (reference, §1.4)."""
    mapping = raw.get("input_mapping")
    config = raw.get("config")
    merged: Dict[str, Any] = {}
    for key, value in (("input_mapping", mapping), ("config", config)):
        if value is None:
            continue
        if isinstance(value, dict):
            merged.update(copy.deepcopy(value))   # the Stage must not share raw's objects
        else:
            report.add(label, key, value, "must be a JSON object of component inputs",
                       'write {"prompt": "..."} (templates like "{{input.x}}" are fine)')
    return merged


def _depends_on(raw, label, report) -> Tuple[str, ...]:
    value = raw.get("depends_on")
    if value is None:
        return ()
    if not isinstance(value, list):
        report.add(label, "depends_on", value, "must be a list of stage ids",
                   'write "depends_on": ["<stage-id>", ...]')
        return ()
    ids: List[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            report.add(label, "depends_on", item, "a dependency must be a stage id string",
                       'write "depends_on": ["<stage-id>", ...]')
        elif item not in ids:
            ids.append(item)
    return tuple(ids)


def _on_error(raw, label, report) -> str:
    value = raw.get("on_error")
    if value is None:
        return "propagate"
    if value in ON_ERROR_VALUES:
        return value
    report.add(label, "on_error", value, "is not an error policy",
               'use "propagate" (fail the run, the default) or "continue" (record the '
               'failure, use fallback_output, go on)')
    return "propagate"


def _enabled(raw, label, report) -> bool:
    value = raw.get("enabled", True)
    if isinstance(value, bool):
        return value
    report.add(label, "enabled", value, "must be true or false", 'write "enabled": false')
    return True


def _timeout_ms(raw, label, report) -> Optional[int]:
    value = raw.get("timeout_ms")
    if value is None:
        return None
    number = _as_int(value)
    if number is None or not TIMEOUT_MS_MIN <= number <= TIMEOUT_MS_MAX:
        report.add(label, "timeout_ms", value,
                   "must be a whole number of milliseconds from {} to {}".format(
                       TIMEOUT_MS_MIN, TIMEOUT_MS_MAX),
                   "give the per-attempt limit in milliseconds (30 s is 30000), or remove it "
                   "to use the component's default")
        return None
    return number


def _retry(raw, label, report) -> Optional[RetryPolicy]:
    config = raw.get("retry_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        report.add(label, "retry_config", config, "must be a JSON object",
                   'write {"max_retries": 2, "initial_delay_ms": 1000}')
        return None
    defaults = RetryPolicy()
    delay_key = "initial_delay_ms" if "initial_delay_ms" in config else "backoff_ms"
    return RetryPolicy(
        max_retries=_bounded_int(config, "max_retries", 0, MAX_RETRIES_LIMIT,
                                 defaults.max_retries, label, report),
        initial_delay_ms=_bounded_int(config, delay_key, 0, RETRY_DELAY_MS_MAX,
                                      defaults.initial_delay_ms, label, report),
        backoff_multiplier=_bounded_number(config, "backoff_multiplier", MULTIPLIER_MIN,
                                           MULTIPLIER_MAX, defaults.backoff_multiplier,
                                           "retry_config", label, report),
        max_delay_ms=_bounded_int(config, "max_delay_ms", 0, RETRY_DELAY_MS_MAX,
                                  defaults.max_delay_ms, label, report),
    )


def _bounded_int(config, key, low, high, default, label, report):
    value = config.get(key)
    if value is None:
        return default
    number = _as_int(value)
    if number is not None and low <= number <= high:
        return number
    report.add(label, "retry_config." + key, value,
               "must be a whole number from {} to {}".format(low, high),
               "write an integer in that range, or remove it to use {}".format(default))
    return default


def _bounded_number(config, key, low, high, default, prefix, label, report):
    value = config.get(key)
    if value is None:
        return default
    number = _as_number(value)
    if number is not None and low <= number <= high:
        return number
    fallback = "" if default is None else " to use {}".format(default)
    report.add(label, "{}.{}".format(prefix, key), value,
               "must be a number from {} to {}".format(low, high),
               "write a number in that range, or remove it{}".format(fallback))
    return default


def _temperature(settings, label, report) -> Optional[float]:
    return _bounded_number(settings, "temperature", TEMPERATURE_MIN, TEMPERATURE_MAX,
                           None, "llm_settings", label, report)


def _max_tokens(settings, label, report) -> Optional[int]:
    value = settings.get("max_tokens")
    if value is None:
        return None
    number = _as_int(value)
    if number is not None and 1 <= number <= MAX_TOKENS_LIMIT:
        return number
    report.add(label, "llm_settings.max_tokens", value,
               "must be a whole number from 1 to {}".format(MAX_TOKENS_LIMIT),
               "write an integer in that range, or remove it")
    return None


# -- Graph checks: duplicates, dependencies, cycles, control-flow references -------------

def _check_graph(stages: List[Stage], report, warnings):
    first: Dict[str, Stage] = {}
    for stage in stages:
        if stage.id in first:
            report.add(_stage_label(stage.id), "id", stage.id,
                       "two stages use this id", "give every stage its own id")
        else:
            first[stage.id] = stage
    deps = {stage_id: stage.depends_on for stage_id, stage in first.items()}
    for stage in first.values():
        for dep in stage.depends_on:
            if dep not in deps:
                report.add(_stage_label(stage.id), "depends_on", dep,
                           "names no stage of this pipeline",
                           "use one of: {}".format(_listing(deps)))
    cycle = _find_cycle(deps)
    if cycle:
        report.add(_stage_label(cycle[0]), "depends_on", list(deps[cycle[0]]),
                   "depends_on forms a cycle: " + " → ".join(cycle) + " (each stage waits "
                   "for the next)", "remove one dependency of the cycle")
    for stage in first.values():
        _check_stage_references(stage, deps, report, warnings)


def _find_cycle(deps: Dict[str, Tuple[str, ...]]) -> Optional[List[str]]:
    """One dependency cycle as a path ``[a, b, ..., a]``; None when there is none.

    Iterative depth-first search, so a long chain of stages cannot hit the recursion limit.
    """
    state: Dict[str, int] = {}          # absent: unvisited, 1: on the path, 2: done
    for root in deps:
        if root in state:
            continue
        path, stack = [root], [iter(deps[root])]
        state[root] = 1
        while stack:
            child = next((c for c in stack[-1] if c in deps and state.get(c) != 2), None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            else:
                state[child] = 1
                path.append(child)
                stack.append(iter(deps[child]))
    return None


def _dependency_order(pipeline_id, deps) -> List[str]:
    """Kahn's order over ``deps`` (declaration order on ties)."""
    cycle = _find_cycle(deps)
    if cycle:
        report = _Report(pipeline_id)
        report.add(_stage_label(cycle[0]), "depends_on", list(deps[cycle[0]]),
                   "depends_on forms a cycle: " + " → ".join(cycle),
                   "remove one dependency of the cycle")
        report.raise_if_any()
    waiting = {stage_id: len(set(d for d in ds if d in deps)) for stage_id, ds in deps.items()}
    dependents: Dict[str, List[str]] = {stage_id: [] for stage_id in deps}
    for stage_id, ds in deps.items():
        for dep in set(d for d in ds if d in deps):
            dependents[dep].append(stage_id)
    ready = [stage_id for stage_id, count in waiting.items() if count == 0]
    order: List[str] = []
    while ready:
        stage_id = ready.pop(0)
        order.append(stage_id)
        for dependent in dependents[stage_id]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)
    return order


def _check_stage_references(stage: Stage, deps, report, warnings):
    """Control-flow inputs that name stages must name existing, other stages (§4.4)."""
    fields = [(name, stage.inputs.get(name)) for name in STAGE_LIST_FIELDS.get(stage.type, ())]
    if stage.type == "router":
        fields.extend(_route_fields(stage, report))
    for field_name, value in fields:
        for target in _stage_list_value(stage, field_name, value, report):
            _check_reference(stage, field_name, target, deps, report, warnings)


def _route_fields(stage, report):
    routes = stage.inputs.get("routes")
    if routes is None or _is_template(routes):
        return []
    if not isinstance(routes, dict):
        report.add(_stage_label(stage.id), "routes", routes,
                   "must be an object of route value → list of stage ids",
                   'write {"urgent": ["escalate"], "normal": ["reply"]}')
        return []
    return [("routes.{}".format(key), value) for key, value in routes.items()]


def _stage_list_value(stage, field_name, value, report):
    if value is None or _is_template(value):
        return []   # a template is resolved per run; nothing to check now
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    report.add(_stage_label(stage.id), field_name, value, "must be a list of stage ids",
               'write ["<stage-id>", ...]')
    return []


def _check_reference(stage, field_name, target, deps, report, warnings):
    label = _stage_label(stage.id)
    if target == stage.id:
        report.add(label, field_name, target, "a control-flow stage cannot name itself",
                   "list the stages it controls, not the stage itself")
    elif target not in deps:
        report.add(label, field_name, target, "names no stage of this pipeline",
                   "use one of: {}".format(_listing(deps)))
    elif not _depends_transitively(target, stage.id, deps):
        # No field name in the text: a stage named by three routes gets one warning.
        warnings.append(
            "stage {!r} is controlled by {} stage {!r} but does not depend on it, so it "
            "may run before {!r} decides; add {!r} to its depends_on".format(
                target, stage.type, stage.id, stage.id, stage.id))


def _depends_transitively(stage_id, ancestor, deps) -> bool:
    seen, todo = set(), list(deps.get(stage_id, ()))
    while todo:
        current = todo.pop()
        if current == ancestor:
            return True
        if current in seen or current not in deps:
            continue
        seen.add(current)
        todo.extend(deps[current])
    return False
