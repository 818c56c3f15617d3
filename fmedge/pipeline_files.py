"""Reading pipeline documents from files (or standard input) for `fm-edge add`."""

import json
import os
import sys

from .errors import UsageError
from .ids import validate_id

# A pipeline document is small; anything bigger is almost surely the wrong file.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024


def read_pipeline_files(paths, pipeline_id=None):
    """[(pipeline_id, document, path)] for every file, all read before anything is stored."""
    if pipeline_id and len(paths) > 1:
        raise UsageError("--id names one pipeline: give it with a single FILE")
    documents = [read_pipeline_file(path, pipeline_id) for path in paths]
    seen = {}
    for pid, _, path in documents:
        if pid in seen:
            raise UsageError(f"pipeline id {pid} comes from both {seen[pid]} and {path}: "
                             "give each file its own id")
        seen[pid] = path
    return documents


def read_pipeline_file(path, pipeline_id=None):
    """Parse one document and work out its id (``--id``, the document's ``id``, the file)."""
    if path == "-" and not pipeline_id:
        raise UsageError("reading a pipeline from standard input needs --id ID")
    document = _load_json(path)
    if not isinstance(document, dict):
        raise UsageError(f"{path}: a pipeline document must be a JSON object, "
                         f"got {type(document).__name__}")
    chosen = pipeline_id or document.get("id") or _id_from_file_name(path)
    validate_id(chosen, "pipeline")
    return chosen, document, path


def _load_json(path):
    try:
        if path == "-":
            text = sys.stdin.read(MAX_DOCUMENT_BYTES + 1)
        else:
            if os.path.getsize(path) > MAX_DOCUMENT_BYTES:
                raise UsageError(f"{path} is larger than {MAX_DOCUMENT_BYTES // 1048576} MB: "
                                 "not a pipeline document")
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason}): save it as UTF-8 JSON")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}; fix the file") from None


def _id_from_file_name(path):
    name = os.path.basename(path)
    for suffix in (".pipeline.json", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
