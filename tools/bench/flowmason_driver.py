"""Runs a pipeline document on the reference FlowMason 1.0.24 `DAGExecutor` and times it.

Runs inside the FlowMason venv (not fm-edge's interpreter); bench_executor.py starts it:

    <venv>/bin/python flowmason_driver.py < request.json

The request is ``{"document": {...}, "inputs": {...}, "runs": N, "warmup": W}``. The driver
builds the component registry once (as a long-lived Studio/CLI process would), then for
each run converts the stages with ``ComponentConfig(**stage)`` (the library path, which
honours ``type`` + ``input_mapping``), makes a fresh ``ExecutionContext`` and
``DAGExecutor`` (default wave-parallel scheduling, no providers: no LLM, no network) and
awaits ``execute(stages, inputs)``. It prints one JSON object on stdout:
``{"times": [seconds per run], "output": <output stage's output>, "statuses": {...}}``
or ``{"error": "..."}``.
"""

import asyncio
import json
import sys
import tempfile
import time
import uuid


def main():
    request = json.load(sys.stdin)
    from flowmason_core.config import ComponentConfig, ExecutionContext
    from flowmason_core.execution.universal_executor import DAGExecutor
    from flowmason_core.registry import ComponentRegistry

    document = request["document"]
    inputs = request["inputs"]
    with tempfile.TemporaryDirectory() as packages:
        registry = ComponentRegistry(packages_dir=packages, auto_scan=False)
        registry.auto_discover()

        async def run_once():
            stages = [ComponentConfig(**stage) for stage in document["stages"]]
            context = ExecutionContext(run_id=uuid.uuid4().hex,
                                       pipeline_id=document.get("id") or document["name"],
                                       pipeline_version=document.get("version", "1.0.0"))
            executor = DAGExecutor(registry=registry, context=context)
            return await executor.execute(stages, json.loads(json.dumps(inputs)))

        async def go():
            for _ in range(request.get("warmup", 1)):
                await run_once()
            times = []
            results = None
            for _ in range(request["runs"]):
                start = time.perf_counter()
                results = await run_once()
                times.append(time.perf_counter() - start)
            return times, results

        try:
            times, results = asyncio.run(go())
        except Exception as error:   # report, don't hide, a reference failure
            print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
            return 1
    output_id = document.get("output_stage_id")
    output = results[output_id].output if output_id in results else None
    statuses = {sid: str(getattr(r.status, "value", r.status)) for sid, r in results.items()}
    print(json.dumps({"times": times, "output": output, "statuses": statuses}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
