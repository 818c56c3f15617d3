"""The cross-process sync lock: one sync at a time per data dir.

``fm-edge sync`` (cron) and the daemon's SyncManager share one result queue and one
pipeline cursor. Two syncs at once would both upload the same batches (the cloud absorbs
it, but it is wasted bandwidth on a metered link) and race on the cursor file. So each
sync pass holds an exclusive ``fcntl.flock`` on ``DATA_DIR/sync.lock``.

flock is released by the kernel when the holder dies, even by SIGKILL: a crashed sync can
never leave the device locked. Locks belong to the open file, not the process, so two
SyncLock objects in one process exclude each other too. The holder writes its pid into
the file, only so the "busy" message can say who holds it.
"""

import fcntl
import os
import time

from ..errors import BusyError
from ..fsutil import ensure_dir, storage_error

LOCK_FILE_NAME = "sync.lock"
POLL_S = 0.05   # how often a waiter retries; a pass holds the lock for seconds at least


class SyncLock:
    """An exclusive, non-reentrant lock on ``DATA_DIR/sync.lock``."""

    def __init__(self, data_dir, *, sleep=time.sleep, monotonic=time.monotonic):
        self.path = os.path.join(os.path.abspath(data_dir), LOCK_FILE_NAME)
        self._sleep = sleep
        self._monotonic = monotonic
        self._fd = None

    @property
    def held(self):
        return self._fd is not None

    def acquire(self, wait_s=0.0):
        """Take the lock, waiting up to ``wait_s`` seconds; False if another sync holds it."""
        if self._fd is not None:
            raise RuntimeError("SyncLock %s is already held by this object" % self.path)
        fd = self._open()
        deadline = self._monotonic() + max(0.0, wait_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self._monotonic() >= deadline:
                    os.close(fd)
                    return False
                self._sleep(POLL_S)
        self._fd = fd
        self._write_holder(fd)
        return True

    def release(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)   # closing the file drops the flock

    def busy_error(self, wait_s):
        holder = self.holder_pid()
        who = " by process %d" % holder if holder else ""
        return BusyError("another sync is running on this device (%s is held%s); waited "
                         "%g s for it: try again when it finishes (the daemon syncs by "
                         "itself when auto_sync is on)" % (self.path, who, wait_s))

    def holder_pid(self):
        """The pid the current holder wrote, or None (informative only)."""
        try:
            with open(self.path, encoding="ascii") as handle:
                text = handle.read(32).strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def __enter__(self):
        if not self.acquire(0.0):
            raise self.busy_error(0.0)
        return self

    def __exit__(self, *exc):
        self.release()

    def _open(self):
        ensure_dir(os.path.dirname(self.path))
        try:
            # Not inherited by child processes (PEP 446), so a spawned helper never keeps
            # the lock alive after this process lets go of it.
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    @staticmethod
    def _write_holder(fd):
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        except OSError:
            pass   # the pid is only for the busy message; the lock itself is held
