"""Cold start of fm-edge.pyz against a bare interpreter, and the file's size.

    python3 tools/bench/bench_startup.py [--runs 21]

Figures: pyz size (target < 400 KB); medians of `python3 -I fm-edge.pyz --version`
(target ratio <= 1.5) and `status` (target <= 3) against `python3 -I -c pass`, each run
interleaved with the baseline. The pyz's bytecode cache lives in this run's temporary
folder and is filled by one warm-up `status`, as the first command on a device does.
"""

import argparse
import os
import sys
import tempfile

from common import build_pyz, interleaved_medians, report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        pyz = build_pyz(os.path.join(work, "fm-edge.pyz"))
        data = os.path.join(work, "data")
        python = [sys.executable, "-I"]
        commands = {
            "pass": python + ["-c", "pass"],
            "version": python + [pyz, "--version"],
            "status": python + [pyz, "--data-dir", data, "status"],
        }
        env = dict(os.environ, FM_EDGE_BYTECODE_CACHE=os.path.join(work, "bytecode"))
        interleaved_medians({"warm-up": commands["status"]}, 1, cwd=work, env=env)
        medians = interleaved_medians(commands, args.runs, cwd=work, env=env)
        report("pyz_size", os.path.getsize(pyz) / 1024, "KB", target="< 400")
        for name, target in (("version", "<= 1.5"), ("status", "<= 3")):
            report(f"cold_{name}", medians[name] * 1000, "ms",
                   baseline=medians["pass"] * 1000, baseline_name="python3 -I -c pass",
                   target=target, runs=args.runs)


if __name__ == "__main__":
    main()
