"""The component registry: one place mapping canonical type names to implementations."""

from .base import ComponentSpec, Field

_REGISTRY = {}
_LOADED_FAMILIES = set()
# Each family is a module registering its components when imported. A run imports only
# the families its stages use: `net` pulls in urllib3, which a cold `fm-edge run` of a
# pipeline without HTTP stages should not pay for.
_FAMILIES = ("data", "transform", "net", "llm", "control")
_OPERATOR_FAMILY = {"http_request": "net", "output_router": "net", "error_router": "net",
                    "local_file": "net", "aggregate": "transform", "join": "transform",
                    "filter_transformer": "transform"}


def component(type_name, fields=None, blocking=False, resolve_inputs=True,
              late_inputs=None):
    """Decorator: register ``run`` as the implementation of ``type_name``."""
    def register(run):
        _REGISTRY[type_name] = ComponentSpec(type_name, run, dict(fields or {}), blocking,
                                             resolve_inputs, late_inputs)
        return run
    return register


def get_component(type_name):
    """The spec for a canonical type name, or None when fm-edge does not implement it."""
    spec = _REGISTRY.get(type_name)
    if spec is None:
        _load(family_of(type_name))
        spec = _REGISTRY.get(type_name)
    return spec


def implemented_types():
    for family in _FAMILIES:
        _load(family)
    return sorted(_REGISTRY)


def family_of(type_name):
    """Which module implements ``type_name`` (by its catalogue category)."""
    from .. import catalog

    kind = catalog.category(type_name)
    if kind == catalog.CONTROL:
        return "control"
    if kind == catalog.LLM:
        return "llm"
    return _OPERATOR_FAMILY.get(type_name, "data")


def _load(family):
    if family in _LOADED_FAMILIES:
        return
    from importlib import import_module

    import_module(f"{__name__}.{family}")
    _LOADED_FAMILIES.add(family)


__all__ = ["component", "get_component", "implemented_types", "Field", "ComponentSpec"]
