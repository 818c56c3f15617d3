"""`fm-edge run`: find the pipeline, read the inputs, run it once in this process."""

import json
import os
import sys

from .errors import UsageError


def run_pipeline(config, target, input_arg=None, timeout=None):
    """Run ``target`` (a cached id, a bundled example id, or a JSON file); return the result."""
    import asyncio

    inputs = read_inputs(input_arg)
    return asyncio.run(_run(config, target, inputs, timeout))


async def _run(config, target, inputs, timeout):
    from .pipeline.executor import EdgeExecutor

    executor = EdgeExecutor(config)
    try:
        pipeline_id, document = _locate(executor, target)
        return await executor.execute(pipeline_id=pipeline_id, inputs=inputs,
                                      document=document, timeout=timeout)
    finally:
        await executor.close()


def _locate(executor, target):
    """(pipeline_id, document or None): a JSON file, else an id the executor resolves
    (cache first, then the bundled examples)."""
    if os.path.isfile(target) or target.endswith(".json") or os.sep in target:
        from .pipeline_files import read_pipeline_file

        pipeline_id, document, _ = read_pipeline_file(target)
        return pipeline_id, document
    return target, None


def read_inputs(input_arg):
    """The run's inputs from --input: inline JSON, '-' (stdin), or a JSON file."""
    if input_arg is None:
        return {}
    text, origin = _input_text(input_arg)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--input {origin} is not valid JSON: {exc}") from None


def _input_text(input_arg):
    stripped = input_arg.strip()
    if input_arg == "-":
        return sys.stdin.read(), "(standard input)"
    if stripped[:1] in ("{", "[", '"') or stripped in ("null", "true", "false"):
        return input_arg, "(inline)"
    try:
        with open(input_arg, encoding="utf-8") as handle:
            return handle.read(), input_arg
    except OSError as exc:
        raise UsageError(f"cannot read --input {input_arg}: {exc.strerror or exc} (give a "
                         "JSON file, '-' for standard input, or inline JSON)") from None
