"""The component registry: one place mapping canonical type names to implementations."""

from .base import ComponentSpec, Field

_REGISTRY = {}
_LOADED = False
# Modules that register components when imported (each is one family).
_MODULES = ("data", "transform", "net", "llm", "control")


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
    _load()
    return _REGISTRY.get(type_name)


def implemented_types():
    _load()
    return sorted(_REGISTRY)


def _load():
    global _LOADED
    if _LOADED:
        return
    from importlib import import_module

    for name in _MODULES:
        import_module(f"{__name__}.{name}")
    _LOADED = True


__all__ = ["component", "get_component", "implemented_types", "Field", "ComponentSpec"]
