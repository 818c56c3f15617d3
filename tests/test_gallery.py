"""The 24 gallery templates of flowmason 1.0.24: stored by `fm-edge add`, and the 19 that
need no external service run to `completed` with a deterministic local LLM."""

import asyncio
import json

import pytest

from conftest import run_cli
from fmedge.config import EdgeConfig
from fmedge.pipeline.executor import EdgeExecutor
from gallery import NEEDS_EXTERNAL_SERVICE, TEMPLATE_NAMES, require_gallery
from llm_double import ScriptedAdapter

LOCAL_ONLY = sorted(set(TEMPLATE_NAMES) - NEEDS_EXTERNAL_SERVICE)

# Nine templates ship an `example_input` that contradicts their own `input_schema`
# (semantics §5): other field names, or optional fields the prompts reference left out.
# The acceptance allows "the nearest valid input": the example's own fields, plus a
# value for every schema property it lacks (the enum's first member, else a plain value
# of the declared type).
_SAMPLES = {"string": "example {}", "integer": 3, "number": 1.5, "boolean": True,
            "object": {}}


def example_input(document):
    given = dict(document.get("example_input") or document.get("sample_input") or {})
    properties = (document.get("input_schema") or {}).get("properties") or {}
    for key, spec in properties.items():
        if key not in given:
            given[key] = sample_value(key, spec)
    return given


def sample_value(key, spec):
    if spec.get("enum"):
        return spec["enum"][0]
    if "default" in spec:
        return spec["default"]
    kind = spec.get("type", "string")
    if kind == "array":
        item = sample_value(key, spec.get("items") or {"type": "string"})
        return [item, item]
    sample = _SAMPLES.get(kind, "example {}")
    return sample.format(key.replace("_", " ")) if isinstance(sample, str) else sample


def test_all_24_templates_are_accepted_by_fm_edge_add(tmp_path):
    templates = require_gallery()
    assert sorted(templates) == sorted(TEMPLATE_NAMES)
    paths = []
    for name, document in templates.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(document))
        paths.append(str(path))
    result = run_cli("--data-dir", str(tmp_path / "edge"), "add", *paths, "--json")
    assert result.code == 0, result
    assert sorted(entry["id"] for entry in result.json()) == sorted(TEMPLATE_NAMES)


@pytest.mark.parametrize("name", LOCAL_ONLY)
def test_local_template_runs_to_completed(tmp_path, name):
    templates = require_gallery()
    document = templates[name]
    executor = EdgeExecutor(EdgeConfig(data_dir=str(tmp_path)), llm=ScriptedAdapter())
    inputs = example_input(document)
    result = asyncio.run(executor.execute(pipeline_id=name, document=document,
                                          inputs=inputs))
    assert result.status == "completed", (result.failed_stage, result.error)
    assert result.output is not None
    ran = [s for s, record in result.stages.items() if record.status == "success"]
    assert ran, "no stage ran"
