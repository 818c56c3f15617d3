"""Pipeline engine: fm-edge's EdgeExecutor against FlowMason 1.0.24's own DAGExecutor.

    python3 tools/bench/bench_executor.py [--rounds 7] [--runs 50] [--cold-runs 21]
                                          [--venv DIR] [--skip-flowmason] [--skip-cold]

The workload is one 10-stage deterministic pipeline (json_transform, filter, conditional,
foreach over 10 items, variable_set; no LLM, no network) written in the dialect both
engines accept: registry type names, ``type`` + ``input_mapping``, plain dot-path
templates, and only the reference's real output fields (json_transform under ``result``,
variable_set read as ``{{upstream.<id>.value}}``, never ``{{context.<name>}}``; foreach with
``loop_stages`` whose body stages depend on the foreach). It completes on both engines, and
the benchmark checks that they return the same output (one JSON line, ``"check"``).

Figures (one JSON line each, a ratio against a baseline measured in the same run):
- ``executor_run_unrecorded`` — median ms per run of ``await EdgeExecutor(record=False)
  .execute(document=...)`` against FlowMason's ``DAGExecutor.execute`` on the same document
  (target ratio <= 0.05, i.e. >= 20x faster). Like for like: FlowMason's executor keeps
  nothing, so neither does fm-edge here;
- ``executor_run`` and ``executor_run_tmpfs`` — the same with fm-edge's default recording
  on (the ResultStore on an ordinary disk, or on /dev/shm): every run also waits for its
  result's fsync'd commit (one at a time here, so no group commit helps), which is work
  FlowMason does not do at all.
- ``executor_run_vs_handwritten`` — the default run against a plain Python function chain
  doing the same transforms (no target: the engine's overhead factor).
- ``executor_run_three_stages`` — microseconds per unrecorded run of the HTTP benchmark's
  3-stage pipeline: the engine's fixed cost per run, which every API request pays.
- ``cold_run_data_processor`` — ``python3 -I fm-edge.pyz run data-processor --input ...``
  against ``python3 -I -c pass``, medians of interleaved runs (target ratio <= 4), with
  the pyz's bytecode cache in a fresh folder filled by one first run; and
  ``cold_run_data_processor_no_site``, the same with ``-S`` on both sides.

FlowMason is installed by this script into a venv cached under
``~/.cache/fm-edge/bench/flowmason-venv`` (``python3 -m venv`` + ``pip install
flowmason==1.0.24``) and runs there through ``flowmason_driver.py``, a subprocess that times
its runs internally and prints JSON. Rounds interleave the engines (fm-edge, FlowMason,
fm-edge, ...); each engine keeps one long-lived executor/registry and is warmed up first.
Both use Python's default (unconfigured) logging.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import build_pyz, interleaved_medians, report

from fmedge.config import EdgeConfig
from fmedge.pipeline.executor import EdgeExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "flowmason_driver.py")
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "fm-edge", "bench",
                            "flowmason-venv")
FLOWMASON_VERSION = "1.0.24"

# -- the workload --------------------------------------------------------------------------

_VALUES = [12.5, 25.0, -1.0, 18.25, 30.5, 7.0, 22.0, -3.5, 19.0, 41.0, 20.5, 3.25]
INPUTS = {
    # 12 readings, 2 negative: the filter keeps 10, so the foreach runs 10 iterations.
    "readings": [{"id": f"r{i}", "value": value, "unit": "C",
                  "site": {"name": "north" if i % 2 else "south"}}
                 for i, value in enumerate(_VALUES)],
    "threshold": 20.0,
    "meta": {"site": "plant-7"},
}

DOCUMENT = {
    "id": "bench-deterministic",
    "name": "bench-deterministic",
    "version": "1.0.0",
    "stages": [
        # 1. reshape the input (json_transform mapping; output under `result`)
        {"id": "normalize", "type": "json_transform", "input_mapping": {
            "data": "{{input}}",
            "mapping": {"readings": "readings", "limit": "threshold", "site": "meta.site"}}},
        # 2. drop invalid readings (filter_array: variable `item`)
        {"id": "valid", "type": "filter", "depends_on": ["normalize"], "input_mapping": {
            "data": "{{upstream.normalize.result.readings}}", "filter_mode": "filter_array",
            "condition": "item['value'] >= 0"}},
        # 3. branch: the loop when something is left, else `empty`
        {"id": "gate", "type": "conditional", "depends_on": ["valid"], "input_mapping": {
            "condition": "{{upstream.valid.passed}}",
            "true_branch_stages": ["each"], "false_branch_stages": ["empty"]}},
        # 4. the false branch (skipped here; variable_set sets no context variable in the
        #    reference, so nothing reads {{context.status}})
        {"id": "empty", "type": "variable_set", "depends_on": ["gate"], "input_mapping": {
            "name": "status", "value": "no valid readings"}},
        # 5. foreach over the 10 valid readings; body = shape, check (in that order)
        {"id": "each", "type": "foreach", "depends_on": ["gate"], "input_mapping": {
            "items": "{{upstream.valid.data}}", "item_variable": "reading",
            "loop_stages": ["shape", "check"]}},
        # 6. body: pick fields of the current item (read via upstream.<foreach>.<item_var>)
        {"id": "shape", "type": "json_transform", "depends_on": ["each"], "input_mapping": {
            "data": "{{upstream.each.reading}}",
            "mapping": {"id": "id", "value": "value", "site": "site.name"}}},
        # 7. body: pass/fail against the threshold (pass_fail: variable `data`)
        {"id": "check", "type": "filter", "depends_on": ["shape"], "input_mapping": {
            "data": {"reading": "{{upstream.shape.result}}",
                     "limit": "{{upstream.normalize.result.limit}}"},
            "condition": "data['reading']['value'] > data['limit']"}},
        # 8. keep the per-item results (the foreach's `results` = last body stage's outputs)
        {"id": "summary", "type": "variable_set", "depends_on": ["each"], "input_mapping": {
            "name": "checks", "value": "{{upstream.each.results}}"}},
        # 9. the readings over the threshold
        {"id": "alerts", "type": "filter", "depends_on": ["summary"], "input_mapping": {
            "data": "{{upstream.summary.value}}", "filter_mode": "filter_array",
            "condition": "item['passed']"}},
        # 10. the report (pass-through json_transform of a templated object)
        {"id": "report", "type": "json_transform", "depends_on": ["alerts", "empty"],
         "input_mapping": {"data": {
             "site": "{{upstream.normalize.result.site}}",
             "processed": "{{upstream.each.processed_items}}",
             "branch": "{{upstream.gate.branch_taken}}",
             "alerts": "{{upstream.alerts.data}}"}}},
    ],
    "output_stage_id": "report",
}


# The HTTP benchmark's pipeline (bench_http.THREE_STAGES), for the fixed cost of a run.
THREE_STAGES = {"id": "bench-three", "version": "1.0.0", "stages": [
    {"id": "a", "type": "json_transform", "config": {"data": {"x": "{{input.x}}"}}},
    {"id": "b", "type": "json_transform", "depends_on": ["a"],
     "config": {"data": {"y": "{{upstream.a.result.x + 1}}"}}},
    {"id": "c", "type": "json_transform", "depends_on": ["b"],
     "config": {"data": {"z": "{{upstream.b.result.y * 2}}"}}},
]}


def hand_written(inputs):
    """The same transforms as DOCUMENT, as a plain function chain."""
    meta = inputs.get("meta") or {}
    normalized = {"readings": inputs.get("readings"), "limit": inputs.get("threshold"),
                  "site": meta.get("site")}
    valid = [item for item in normalized["readings"] if item["value"] >= 0]
    branch = "true" if valid else "false"
    checks = []
    if valid:
        for reading in valid:
            shaped = {"id": reading.get("id"), "value": reading.get("value"),
                      "site": (reading.get("site") or {}).get("name")}
            data = {"reading": shaped, "limit": normalized["limit"]}
            passed = data["reading"]["value"] > data["limit"]
            checks.append({"passed": passed, "data": data if passed else None,
                           "filtered_count": 0, "reason": f"Expression = {passed!r}"})
    alerts = [check for check in checks if check["passed"]]
    return {"result": {"site": normalized["site"], "processed": len(valid),
                       "branch": branch, "alerts": alerts},
            "fields_mapped": 0, "fields_missing": []}


# -- FlowMason venv and driver -------------------------------------------------------------

def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def ensure_flowmason(venv):
    """A venv with flowmason==1.0.24, reused when it is already there."""
    python = venv_python(venv)
    probe = ("import importlib.metadata as m, flowmason_core; "
             f"assert m.version('flowmason') == '{FLOWMASON_VERSION}'")
    if os.path.exists(python) and subprocess.run(
            [python, "-c", probe], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL).returncode == 0:
        return python
    print(f"# installing flowmason=={FLOWMASON_VERSION} into {venv} ...", file=sys.stderr,
          flush=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"flowmason=={FLOWMASON_VERSION}"], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


def run_flowmason(python, runs, warmup=3):
    """{"times": [...], "output": ..., "statuses": {...}} from the driver."""
    request = json.dumps({"document": DOCUMENT, "inputs": INPUTS, "runs": runs,
                          "warmup": warmup})
    done = subprocess.run([python, DRIVER], input=request, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    try:
        reply = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"flowmason driver failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    if "error" in reply:
        raise SystemExit(f"FlowMason could not run the benchmark pipeline: {reply['error']}")
    return reply


# -- fm-edge in process --------------------------------------------------------------------

class EdgeVariant:
    """One long-lived EdgeExecutor (as a process would share it) on its own data dir."""

    def __init__(self, name, data_dir, record=True):
        self.name = name
        self.executor = EdgeExecutor(EdgeConfig(data_dir=data_dir), record=record)
        self.samples = []
        self.last = None

    async def time_runs(self, runs):
        for _ in range(runs):
            start = time.perf_counter()
            result = await self.executor.execute(document=DOCUMENT, inputs=INPUTS)
            self.samples.append(time.perf_counter() - start)
            self.last = result
        if self.last.status != "completed":
            raise SystemExit(f"fm-edge run failed ({self.name}): {self.last.error}")


def time_hand_written(runs, batch=200):
    """Per-call seconds: each sample is the mean over a batch (a call is microseconds)."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(batch):
            hand_written(INPUTS)
        samples.append((time.perf_counter() - start) / batch)
    return samples


# -- comparing outputs ---------------------------------------------------------------------

def without_reasons(value):
    """The output minus filter `reason` texts (free-form messages, quoted differently)."""
    if isinstance(value, dict):
        return {key: without_reasons(item) for key, item in value.items() if key != "reason"}
    if isinstance(value, list):
        return [without_reasons(item) for item in value]
    return value


def differences(left, right, path="$", found=None, limit=5):
    found = [] if found is None else found
    if len(found) >= limit:
        return found
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(set(left) | set(right)):
            if key not in left or key not in right:
                found.append(f"{path}.{key}: only in {'fm-edge' if key in left else 'other'}")
            else:
                differences(left[key], right[key], f"{path}.{key}", found, limit)
    elif isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        for index, (a, b) in enumerate(zip(left, right)):
            differences(a, b, f"{path}[{index}]", found, limit)
    elif left != right:
        found.append(f"{path}: fm-edge {json.dumps(left)[:80]} vs {json.dumps(right)[:80]}")
    return found[:limit]


def check_outputs(edge_result, flowmason_reply):
    edge_output = json.loads(json.dumps(edge_result.output))
    hand_output = hand_written(INPUTS)
    line = {"check": "same_output", "output_stage": "report",
            "fm_edge_vs_handwritten": without_reasons(edge_output) == without_reasons(
                hand_output)}
    if flowmason_reply is not None:
        reference = flowmason_reply["output"]
        edge_statuses = {sid: record.status for sid, record in edge_result.stages.items()}
        line.update(
            fm_edge_vs_flowmason=without_reasons(edge_output) == without_reasons(reference),
            exact_incl_reason_texts=edge_output == reference,
            stage_statuses_agree=edge_statuses == flowmason_reply["statuses"],
            differences=differences(edge_output, reference, limit=2))
        if not line["stage_statuses_agree"]:
            line["statuses"] = {"fm-edge": edge_statuses,
                                "flowmason": flowmason_reply["statuses"]}
    line["alerts"] = [a["data"]["reading"]["id"] for a in edge_output["result"]["alerts"]]
    print(json.dumps(line), flush=True)
    return line


# -- the benchmarks ------------------------------------------------------------------------

def bench_engines(args, work):
    pristine = json.dumps([DOCUMENT, INPUTS], sort_keys=True)
    python = None if args.skip_flowmason else ensure_flowmason(args.venv)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as shm_dir:
        variants = [EdgeVariant("default", os.path.join(work, "edge-default")),
                    EdgeVariant("tmpfs", os.path.join(shm_dir, "edge")),
                    EdgeVariant("unrecorded", os.path.join(work, "edge-unrecorded"),
                                record=False)]
        loop = asyncio.new_event_loop()
        try:
            for variant in variants:                       # warm-up: stores, imports
                loop.run_until_complete(variant.time_runs(3))
                variant.samples.clear()
            hand, flowmason, reply = [], [], None
            for _ in range(args.rounds):
                for variant in variants:
                    loop.run_until_complete(variant.time_runs(args.runs))
                hand.extend(time_hand_written(args.runs))
                if python:
                    reply = run_flowmason(python, args.runs)
                    flowmason.extend(reply["times"])
            for variant in variants:
                loop.run_until_complete(variant.executor.close())
        finally:
            loop.close()
    if json.dumps([DOCUMENT, INPUTS], sort_keys=True) != pristine:
        raise SystemExit("an engine mutated the shared document or inputs; copy them per run")

    check_outputs(variants[0].last, reply)
    ms = {variant.name: statistics.median(variant.samples) * 1000 for variant in variants}
    extra = {"rounds": args.rounds, "runs_per_round": args.runs, "stages": 10,
             "foreach_items": 10}
    if python:
        reference = statistics.median(flowmason) * 1000
        names = {"default": ("executor_run", "recording on, data dir on disk"),
                 "tmpfs": ("executor_run_tmpfs", "recording on, ResultStore on tmpfs"),
                 "unrecorded": ("executor_run_unrecorded", "record=False")}
        for name, (figure, how) in names.items():
            report(figure, ms[name], "ms", baseline=reference,
                   baseline_name=f"flowmason {FLOWMASON_VERSION} DAGExecutor.execute",
                   target="<= 0.05 (fm-edge >= 20x faster)" if name == "unrecorded"
                   else None,
                   fm_edge=how, speedup=round(reference / ms[name], 2), **extra)
    report("executor_run_vs_handwritten", ms["default"], "ms",
           baseline=statistics.median(hand) * 1000,
           baseline_name="hand-written Python function chain", fm_edge="recording on",
           unrecorded_ratio=round(ms["unrecorded"] / (statistics.median(hand) * 1000), 1),
           **extra)


def bench_three_stages(args, work):
    executor = EdgeExecutor(EdgeConfig(data_dir=os.path.join(work, "edge-three")),
                            record=False)
    runs = args.runs * 20     # a run is tens of microseconds: time batches of them

    async def batch(count):
        for _ in range(count):
            result = await executor.execute(document=THREE_STAGES, inputs={"x": 1})
        if result.status != "completed" or result.output["result"] != {"z": 4}:
            raise SystemExit(f"fm-edge 3-stage run failed: {result.error}")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(batch(50))                  # warm-up
        samples = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            loop.run_until_complete(batch(runs))
            samples.append((time.perf_counter() - start) / runs)
    finally:
        loop.close()
    report("executor_run_three_stages", statistics.median(samples) * 1e6, "us",
           fm_edge="record=False", stages=3, rounds=args.rounds, runs_per_round=runs)


def bench_cold(args, work):
    pyz = build_pyz(os.path.join(work, "fm-edge.pyz"))
    data = os.path.join(work, "cold-data")
    readings = json.dumps({"sensor_data": [12.5, 13.0, 12.8, 13.1, 12.9, 30.0, 12.7, 13.2,
                                           12.6, 13.0]})
    # The pyz's bytecode cache starts empty in this run's own folder; the first run below
    # fills it, as the first command after installing does on a device.
    env = dict(os.environ, FM_EDGE_BYTECODE_CACHE=os.path.join(work, "bytecode"))
    for flags, suffix in ((["-I"], ""), (["-I", "-S"], "_no_site")):
        python = [sys.executable] + flags
        commands = {
            "pass": python + ["-c", "pass"],
            "run": python + [pyz, "run", "data-processor", "--data-dir", data, "--input",
                             readings],
        }
        # First run creates the data dir (device id, stores): not what is being measured.
        first = subprocess.run(commands["run"], cwd=work, capture_output=True, text=True,
                               env=env)
        if first.returncode != 0:
            raise SystemExit(f"fm-edge.pyz run data-processor failed (exit "
                             f"{first.returncode}):\n{first.stderr[-3000:]}")
        medians = interleaved_medians(commands, args.cold_runs, cwd=work, env=env)
        # _no_site: both without site-packages' .pth hooks, which some machines load at
        # every start (a sandbox's CA hook imports certifi): the stricter comparison.
        report(f"cold_run_data_processor{suffix}", medians["run"] * 1000, "ms",
               baseline=medians["pass"] * 1000,
               baseline_name=f"python3 {' '.join(flags)} -c pass",
               target="<= 4" if not suffix else None, runs=args.cold_runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--runs", type=int, default=50, help="pipeline runs per round")
    parser.add_argument("--cold-runs", type=int, default=21, help="cold CLI runs (>= 20)")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="FlowMason venv (cached)")
    parser.add_argument("--skip-flowmason", action="store_true")
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        bench_engines(args, work)
        bench_three_stages(args, work)
        if not args.skip_cold:
            bench_cold(args, work)


if __name__ == "__main__":
    main()
