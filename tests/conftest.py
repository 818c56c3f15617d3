"""Shared fixtures: isolated data dirs and a runner for the real `fm-edge` command."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def _bytecode_cache_in_tmp(tmp_path_factory):
    """fm-edge.pyz runs in tests cache their bytecode here, never in the user's ~/.cache."""
    previous = os.environ.get("FM_EDGE_BYTECODE_CACHE")
    os.environ["FM_EDGE_BYTECODE_CACHE"] = str(tmp_path_factory.mktemp("bytecode"))
    yield
    if previous is None:
        os.environ.pop("FM_EDGE_BYTECODE_CACHE", None)
    else:
        os.environ["FM_EDGE_BYTECODE_CACHE"] = previous


def clean_env(**extra):
    """The environment minus every FLOWMASON_*/OLLAMA_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLOWMASON_", "OLLAMA_"))}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


class CliResult:
    def __init__(self, proc):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"<exit {self.code}\nstdout: {self.out}\nstderr: {self.err}>"


def run_cli(*args, env=None, stdin=None, cwd=None, command=None, timeout=60):
    """Run `python3 -m fmedge ARGS` (or ``command``) in a child process."""
    argv = list(command or [sys.executable, "-m", "fmedge"]) + [str(a) for a in args]
    proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env or clean_env(), cwd=cwd or ROOT,
                          timeout=timeout)
    return CliResult(proc)


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "edge"
    return str(path)


@pytest.fixture
def cli(data_dir):
    """`fm-edge --data-dir <tmp> ...` as a function returning a CliResult."""
    def invoke(*args, **kwargs):
        return run_cli("--data-dir", data_dir, *args, **kwargs)
    return invoke
