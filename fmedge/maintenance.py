"""Clearing caches: the one implementation behind `fm-edge clear-cache` and the API."""

import logging

log = logging.getLogger("fmedge.maintenance")


def clear_cache(runtime, kinds, include_pending=False):
    """Delete the chosen kinds; pending results survive unless ``include_pending``."""
    report = {}
    if "pipelines" in kinds:
        report["pipelines"] = runtime.pipelines.clear()
    if "models" in kinds:
        from .cache.models import clear_models

        report["models"] = len(clear_models(runtime.config)["removed"])
    if "results" in kinds:
        report["results"] = runtime.results.clear(include_pending=include_pending)
        if not include_pending:
            report["pending_kept"] = runtime.results.stats()["pending"]
    log.info("clear-cache: %s", report)
    return report


