"""Shared helpers for benchmarks: figures printed as one JSON line each."""

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def report(name, value, unit, baseline=None, baseline_name=None, target=None, **extra):
    """Print one figure; with a baseline, also the ratio value/baseline."""
    line = {"figure": name, "value": round(value, 4), "unit": unit}
    if baseline is not None:
        line.update(baseline=round(baseline, 4), baseline_name=baseline_name,
                    ratio=round(value / baseline, 3) if baseline else None)
    if target is not None:
        line["target"] = target
    line.update(extra)
    print(json.dumps(line), flush=True)
    return line


def time_command(argv, cwd=None, env=None):
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def interleaved_medians(commands, runs, cwd=None, env=None):
    """{name: median seconds}, running the commands in turn so drift hits all alike."""
    samples = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            samples[name].append(time_command(argv, cwd=cwd, env=env))
    return {name: statistics.median(values) for name, values in samples.items()}


def build_pyz(target):
    subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py"), "--output", target],
                   check=True, stdout=subprocess.DEVNULL)
    return target
