"""Who owns a record: a token for this process that survives pid reuse and reboots.

A run left ``running`` by a process that no longer exists must become ``interrupted``;
one still owned by a live process (the CLI running beside the daemon) must not. A bare
pid is not enough (pids are reused, and reset on reboot), so the token also carries the
boot id and the process start time where Linux provides them.
"""

import os

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def owner_token(pid=None):
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{pid}:{_start_time(pid)}"


def owner_alive(token):
    """True if the process that made ``token`` is still running."""
    try:
        boot, pid_text, start = token.split(":")
        pid = int(pid_text)
    except (AttributeError, ValueError):
        return False
    if boot != _boot_id():
        return False
    if not pid_exists(pid):
        return False
    return start == "" or start == _start_time(pid)


def _boot_id():
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as handle:
            return handle.read().strip().replace(":", "")
    except OSError:
        return ""


def _start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return ""
    # Field 22 (starttime); the command name in field 2 may contain spaces or ')'.
    return text.rsplit(")", 1)[-1].split()[19]


def pid_exists(pid):
    """True while a process with this pid exists (ours to signal or not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
