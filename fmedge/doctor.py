"""`fm-edge doctor`: what works on this device, what does not, and how to fix it.

``doctor_report(config)`` runs every check and returns JSON-ready data::

    {"ok": bool, "checks": [{"name", "ok", "detail", "fix"}...]}

``fix`` is present only when ``ok`` is false. No check can crash the report: an
unexpected error becomes a failed check that names it. Checks that talk to something use
short timeouts, the cloud is contacted only when ``cloud_url`` is set, and llama-cpp-python
is imported in a child process, because a native library built for the wrong CPU kills
the process that imports it (SIGILL) and doctor is what users run to find that out.
"""

import os
import platform
import subprocess
import sys
import tempfile

from .fsutil import free_bytes
from .progress import human_bytes

BACKEND_TIMEOUT_S = 5.0
CLOUD_CONNECT_TIMEOUT_S = 3.0
CLOUD_READ_TIMEOUT_S = 5.0
LLAMA_PROBE_TIMEOUT_S = 30.0      # a first import of llama_cpp loads a large .so
MIN_PYTHON = (3, 9)
_PROBE = "import llama_cpp; print(llama_cpp.__version__)"


def doctor_report(config):
    """Run every check for ``config``; ``report["ok"]`` is true only if all passed."""
    checks = [_guarded(name, check, config) for name, check in _CHECKS]
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def format_report(report):
    """Lines for a human: one per check, with its fix underneath when it failed."""
    lines = []
    for check in report["checks"]:
        lines.append("%-4s  %-14s %s" % ("ok" if check["ok"] else "FAIL", check["name"],
                                         check["detail"]))
        if not check["ok"] and check.get("fix"):
            lines.append("      %-14s fix: %s" % ("", check["fix"]))
    lines.append("all checks passed" if report["ok"] else "some checks failed")
    return lines


def exit_code(report):
    return 0 if report["ok"] else 1


# -- the checks --------------------------------------------------------------------------------

def _result(name, ok, detail, fix=None):
    check = {"name": name, "ok": bool(ok), "detail": detail}
    if not ok:
        check["fix"] = fix or "see the detail above"
    return check


def _guarded(name, check, config):
    try:
        return check(name, config)
    except Exception as exc:    # doctor reports problems; it never becomes one
        return _result(name, False, "the check itself failed: %s: %s"
                       % (type(exc).__name__, exc), "report this as a bug in fm-edge")


def check_python(name, config):
    version = "Python %s (%s)" % (platform.python_version(), sys.executable)
    return _result(name, sys.version_info[:2] >= MIN_PYTHON, version,
                   "install Python %d.%d or newer" % MIN_PYTHON)


def check_urllib3(name, config):
    try:
        import urllib3
    except ImportError as exc:
        return _result(name, False, "urllib3 does not import (%s)" % exc,
                       "run fm-edge.pyz (it bundles urllib3), or `pip install 'urllib3>=2,<3'`")
    return _result(name, True, "urllib3 %s" % urllib3.__version__)


def check_data_dir(name, config):
    path = config.data_dir
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return _result(name, False, "%s is not writable: %s" % (path, exc.strerror or exc),
                       "fix its permissions, or choose another data dir with --data-dir or "
                       "FLOWMASON_EDGE_DATA_DIR")
    return _result(name, True, "%s is writable" % path)


def check_disk(name, config):
    path = _existing_parent(config.data_dir)
    free = free_bytes(path)
    keep = int(config.min_free_disk_mb * 1024 * 1024)
    detail = "%s free on the disk holding %s (min_free_disk_mb keeps %s)" % (
        human_bytes(free), path, human_bytes(keep))
    return _result(name, free > keep, detail,
                   "free some space: `fm-edge clear-cache`, `fm-edge models rm NAME`, or "
                   "delete other files on that disk")


def check_backend(name, config):
    if config.llm_backend == "llamacpp":
        return _check_model_file(name, config)
    from .cache.models import quick_adapter, run_sync
    from .errors import FmEdgeError

    async def ask():
        adapter = quick_adapter(config, BACKEND_TIMEOUT_S)
        try:
            if config.llm_backend == "ollama":
                return "Ollama %s" % await adapter.version(), adapter.base_url
            await adapter.list_models()
            return "an OpenAI-compatible server", adapter.base_url
        finally:
            await adapter.close()
    try:
        what, url = run_sync(ask())
    except FmEdgeError as exc:
        return _result(name, False, "llm_backend %s does not answer: %s"
                       % (config.llm_backend, exc), _backend_fix(config))
    return _result(name, True, "llm_backend %s: %s answers at %s"
                   % (config.llm_backend, what, url))


def _backend_fix(config):
    if config.llm_backend == "ollama":
        return ("start Ollama (`ollama serve`), or point llm_base_url / OLLAMA_HOST at the "
                "address it listens on")
    return ("start the server, or fix llm_base_url (`fm-edge config set llm_base_url "
            "http://HOST:PORT`)")


def _check_model_file(name, config):
    from .adapters.factory import model_path
    from .cache.download import gguf_problem
    from .errors import FmEdgeError
    try:
        path = model_path(config, config.llm_model)
    except FmEdgeError as exc:
        return _result(name, False, "llm_backend llamacpp: %s" % exc,
                       "import the model with `fm-edge models add FILE`, or set llm_model to "
                       "the path of a .gguf file")
    problem = gguf_problem(path, path)
    if problem is not None:
        return _result(name, False, "llm_backend llamacpp: %s" % problem,
                       "point llm_model at a .gguf model, or download it again")
    return _result(name, True, "llm_backend llamacpp: model file %s (%s, GGUF)"
                   % (path, human_bytes(os.path.getsize(path))))


def check_model(name, config):
    """Does the backend have llm_model? (llamacpp: covered by the backend check.)"""
    if config.llm_backend == "llamacpp":
        return _result(name, True, "llm_model %s (checked with the backend)" % config.llm_model)
    from .cache.models import backend_models, ollama_full_name
    names, error = backend_models(config, BACKEND_TIMEOUT_S)
    if error is not None:
        return _result(name, False, "llm_model %s not checked: the backend does not answer "
                       "(see the backend check)" % config.llm_model,
                       "fix the backend first")
    wanted = config.llm_model
    if config.llm_backend == "ollama":
        found = ollama_full_name(wanted) in {ollama_full_name(n) for n in names}
    else:
        found = not wanted or wanted in names or len(names) == 1
    shown = ", ".join(names) if names else "none"
    return _result(name, found, "llm_model %s; the backend has: %s" % (wanted or "-", shown),
                   "download it with `fm-edge models pull %s`, or set llm_model to one of "
                   "the models listed" % wanted)


def check_model_cache(name, config):
    from .cache.models import ModelCache
    cache = ModelCache(config=config)
    stats = cache.stats()
    names = ", ".join(e["name"] for e in cache.list()) or "none"
    return _result(name, True, "%d cached (%s of %s) in %s: %s" % (
        stats["count"], human_bytes(stats["used_bytes"]), human_bytes(stats["max_bytes"]),
        stats["cache_dir"], names))


def check_llama_cpp(name, config):
    probe = probe_llama_cpp()
    needed = config.llm_backend == "llamacpp"
    if probe["ok"]:
        return _result(name, True, "llama-cpp-python %s imports" % probe["version"])
    from .adapters.llamacpp import LLAMA_CPP_PIN
    detail = "llama-cpp-python does not import: %s" % probe["detail"]
    if not needed:
        return _result(name, True, detail + " (only needed for llm_backend llamacpp)")
    return _result(name, False, detail, "install it with `%s -m pip install "
                   "llama-cpp-python==%s` (it compiles llama.cpp: needs a C compiler and "
                   "cmake), or set llm_backend to ollama" % (sys.executable, LLAMA_CPP_PIN))


def probe_llama_cpp(python=None, env=None, timeout=LLAMA_PROBE_TIMEOUT_S):
    """Import llama_cpp in a child process: {ok, version, detail}; never crashes this one."""
    command = [python or sys.executable, "-c", _PROBE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "version": None,
                "detail": "importing it took more than %g s" % timeout}
    except OSError as exc:
        return {"ok": False, "version": None, "detail": "cannot run %s: %s" % (command[0], exc)}
    if done.returncode == 0:
        return {"ok": True, "version": done.stdout.strip(), "detail": ""}
    if done.returncode < 0:
        detail = "the import killed the interpreter with signal %d (a native library built " \
                 "for another CPU, or a broken install)" % -done.returncode
    else:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else "exit status %d" % done.returncode
    return {"ok": False, "version": None, "detail": detail}


def check_cloud(name, config):
    if not config.cloud_url:
        return _result(name, True, "not configured (offline only)")
    from .device import ensure_device_id
    from .errors import FmEdgeError
    from .sync.client import CloudClient
    try:
        device_id = ensure_device_id(config)
    except FmEdgeError:
        device_id = "edge-doctor"     # the data dir check reports why it could not be kept
    try:
        with CloudClient(config.cloud_url, config.api_key, device_id,
                         ca_bundle=config.ca_bundle or None,
                         connect_timeout=CLOUD_CONNECT_TIMEOUT_S,
                         read_timeout=CLOUD_READ_TIMEOUT_S) as client:
            client.ping()
    except FmEdgeError as exc:
        return _result(name, False, "%s: %s" % (config.cloud_url, exc),
                       "check cloud_url and api_key (`fm-edge config set ...`); results "
                       "stay queued meanwhile")
    return _result(name, True, "%s answers and accepts the api_key" % config.cloud_url)


def _existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


_CHECKS = (
    ("python", check_python),
    ("urllib3", check_urllib3),
    ("data_dir", check_data_dir),
    ("disk", check_disk),
    ("backend", check_backend),
    ("model", check_model),
    ("model_cache", check_model_cache),
    ("llama_cpp", check_llama_cpp),
    ("cloud", check_cloud),
)
