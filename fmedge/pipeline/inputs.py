"""Checking a run's inputs against the pipeline's ``input_schema`` before any stage runs.

The reference never validates (semantics §1.10), so a missing optional field fails deep
inside a template. fm-edge checks ``required``, applies ``default``s and checks basic JSON
types of top-level properties, and names the field and the fix when something is wrong.
"""

from ..errors import UsageError

_TYPES = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


def apply_input_schema(pipeline, inputs):
    """Return ``inputs`` with defaults filled in; raise UsageError naming each problem."""
    if inputs is None:
        inputs = {}
    schema = pipeline.input_schema or {}
    if not schema:
        return inputs
    if not isinstance(inputs, dict):
        raise UsageError(f"pipeline {pipeline.id}: inputs must be a JSON object, "
                         f"got {type(inputs).__name__}")
    properties = schema.get("properties") or {}
    merged = dict(inputs)
    for name, spec in properties.items():
        if name not in merged and isinstance(spec, dict) and "default" in spec:
            merged[name] = spec["default"]
    problems = _missing(schema, merged) + _wrong_types(properties, merged)
    if problems:
        raise UsageError(f"pipeline {pipeline.id}: invalid inputs: " + "; ".join(problems))
    return merged


def _missing(schema, inputs):
    required = schema.get("required") or []
    return [f"'{name}' is required (add it to the input JSON)" for name in required
            if name not in inputs]


def _wrong_types(properties, inputs):
    problems = []
    for name, spec in properties.items():
        if name not in inputs or not isinstance(spec, dict) or "type" not in spec:
            continue
        allowed = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if not any(_is_type(inputs[name], t) for t in allowed):
            problems.append(f"'{name}' must be {' or '.join(allowed)}, got "
                            f"{_json_type(inputs[name])} {_short(inputs[name])}")
    return problems


def _is_type(value, type_name):
    python_types = _TYPES.get(type_name)
    if python_types is None:
        return True  # an unknown type name is not ours to refuse
    if isinstance(value, bool) and type_name in ("integer", "number"):
        return False
    return isinstance(value, python_types)


def _json_type(value):
    for name, python_types in _TYPES.items():
        if _is_type(value, name) and name != "number":
            return name
    return type(value).__name__


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
