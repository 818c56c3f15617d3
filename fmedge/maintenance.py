"""Clearing caches: the one implementation behind `fm-edge clear-cache` and the API."""

import logging
import os

from .fsutil import storage_error

log = logging.getLogger("fmedge.maintenance")


def clear_cache(runtime, kinds, include_pending=False):
    """Delete the chosen kinds; pending results survive unless ``include_pending``."""
    report = {}
    if "pipelines" in kinds:
        report["pipelines"] = runtime.pipelines.clear()
    if "models" in kinds:
        report["models"] = clear_model_files(runtime.config.model_cache_dir)
    if "results" in kinds:
        report["results"] = runtime.results.clear(include_pending=include_pending)
        if not include_pending:
            report["pending_kept"] = runtime.results.stats()["pending"]
    log.info("clear-cache: %s", report)
    return report


def clear_model_files(model_dir):
    """Remove every file in the model cache directory; returns how many."""
    if not os.path.isdir(model_dir):
        return 0
    removed = 0
    for entry in os.scandir(model_dir):
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            try:
                os.unlink(entry.path)
            except OSError as exc:
                raise storage_error(exc, entry.path) from exc
            removed += 1
    return removed
