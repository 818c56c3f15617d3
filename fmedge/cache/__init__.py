"""On-device stores: pipelines, models and results, each in its own directory."""

from .pipelines import PipelineCache
from .results import ResultStore

__all__ = ["PipelineCache", "ResultStore", "ModelCache"]


def __getattr__(name):
    # The model cache pulls in download code; load it only when asked for.
    if name == "ModelCache":
        from .models import ModelCache
        return ModelCache
    raise AttributeError(f"module 'fmedge.cache' has no attribute {name!r}")
