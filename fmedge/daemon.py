"""The background daemon: `fm-edge start`, `stop`, and what `status` says about it.

`serve` runs in the foreground (systemd, Docker) and keeps a pidfile in the data dir for
as long as it runs; `start` launches `serve` detached, with its output in
`DATA_DIR/logs/fm-edge.log`, and returns once it answers; `stop` sends SIGTERM (runs
finish or are interrupted within the grace period) and waits for the process to end.
The pidfile holds an owner token (boot id, pid, start time), so a stale file left by a
crash or a reused pid never blocks a new start.
"""

import json
import os
import signal
import subprocess
import sys
import time

from .errors import BusyError, FmEdgeError, StorageError
from .fsutil import atomic_write
from .process import owner_alive, owner_token, pid_exists

PIDFILE_NAME = "fm-edge.pid"
START_TIMEOUT_S = 30.0       # a Pi with a slow SD card can take a while to open its stores
STOP_TIMEOUT_S = 20.0        # the server's grace period plus flushing


def pidfile_path(config):
    return os.path.join(config.data_dir, PIDFILE_NAME)


def running_daemon(config):
    """The pidfile's content when its process is alive, else None."""
    try:
        with open(pidfile_path(config), encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and owner_alive(info.get("owner", "")) else None


def claim_pidfile(config, host, port):
    """Record this process as the daemon; refuse when another live one holds the file."""
    other = running_daemon(config)
    if other is not None and other.get("pid") != os.getpid():
        raise BusyError(f"fm-edge is already running for {config.data_dir} (pid "
                        f"{other['pid']}, http://{other['host']}:{other['port']}); stop it "
                        "with `fm-edge stop` first")
    info = {"pid": os.getpid(), "owner": owner_token(), "host": host, "port": port,
            "started_at": time.time()}
    atomic_write(pidfile_path(config), json.dumps(info).encode("utf-8"), mode=0o644)
    return info


def release_pidfile(config):
    info = running_daemon(config)
    if info is None or info.get("pid") == os.getpid():
        try:
            os.unlink(pidfile_path(config))
        except FileNotFoundError:
            pass


def start_background(config, serve_argv, log_path):
    """Launch ``serve_argv`` detached; return its pidfile info once it is serving."""
    other = running_daemon(config)
    if other is not None:
        raise BusyError(f"fm-edge is already running (pid {other['pid']}, "
                        f"http://{other['host']}:{other['port']})")
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(serve_argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=log, start_new_session=True, close_fds=True)
    return _wait_until_serving(config, child, log_path)


def _wait_until_serving(config, child, log_path):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = running_daemon(config)
        if info is not None and info.get("pid") == child.pid:
            return info
        if child.poll() is not None:
            raise FmEdgeError(f"fm-edge serve exited with code {child.returncode} while "
                              f"starting; its log is {log_path}: {_last_line(log_path)}")
        time.sleep(0.05)
    child.terminate()
    raise FmEdgeError(f"fm-edge serve did not start within {START_TIMEOUT_S:.0f} s; "
                      f"see {log_path}")


def stop_daemon(config, timeout_s=STOP_TIMEOUT_S, force=False):
    """SIGTERM the daemon and wait for it to end; SIGKILL with ``force`` or on timeout."""
    info = running_daemon(config)
    if info is None:
        return {"stopped": False, "running": False}
    pid = info["pid"]
    _signal(pid, signal.SIGKILL if force else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_daemon(config) is None and not pid_exists(pid):
            return {"stopped": True, "pid": pid, "forced": force}
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL)   # it ignored the grace period: the second signal forces
    return {"stopped": True, "pid": pid, "forced": True}


def daemon_status(config):
    """Is the daemon running; pid, uptime, URL, and its /health detail when it answers."""
    info = running_daemon(config)
    if info is None:
        return {"running": False}
    status = {"running": True, "pid": info["pid"],
              "url": f"http://{info['host']}:{info['port']}",
              "uptime_s": round(time.time() - info.get("started_at", time.time()), 1)}
    status["health"] = _health(info, config.api_token)
    return status


def _health(info, token):
    """The daemon's /health over loopback (stdlib only: status must start fast)."""
    from urllib.error import URLError
    from urllib.request import Request, urlopen

    host = info["host"] if info["host"] not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    request = Request(f"http://{host}:{info['port']}/health")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urlopen(request, timeout=2) as response:
            return json.loads(response.read().decode("utf-8"))
    except (URLError, OSError, ValueError) as error:
        return {"error": f"the daemon did not answer /health: {error}"}


def serve_command(argv_options):
    """The command line that runs `serve` with the same interpreter and flags."""
    base = [sys.executable]
    if sys.flags.isolated:
        base.append("-I")
    entry = sys.argv[0] if sys.argv and sys.argv[0].endswith(".pyz") else None
    base += [entry] if entry else ["-m", "fmedge"]
    return base + list(argv_options) + ["serve"]


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as error:
        raise StorageError(f"cannot signal fm-edge (pid {pid}): {error}; run stop as the "
                           "user that started it") from error


def _last_line(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else "(empty log)"
