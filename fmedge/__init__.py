"""fm-edge: run FlowMason pipelines on edge devices, offline first.

The public API (the seed document's names) loads lazily, so `fm-edge --version` and
`import fmedge` stay cheap: ``from fmedge import EdgeConfig, create_runtime``.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "EdgeConfig": "fmedge.config",
    "EdgeRuntime": "fmedge.runtime",
    "create_runtime": "fmedge.runtime",
    "PipelineCache": "fmedge.cache.pipelines",
    "ResultStore": "fmedge.cache.results",
    "FmEdgeError": "fmedge.errors",
    "EdgeExecutor": "fmedge.pipeline.executor",
    "ExecutionResult": "fmedge.pipeline.result",
    "SyncManager": "fmedge.sync.manager",
    "SyncStatus": "fmedge.sync.manager",
}

__all__ = ["__version__"] + sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fmedge' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(module), name)
