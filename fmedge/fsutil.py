"""Durable file operations: atomic replace with fsync, directory checks, free space."""

import errno
import os

from .errors import StorageError


def atomic_write(path, data, mode=0o600):
    """Write ``data`` (bytes) to ``path`` so a crash leaves the old file or the new one.

    The temporary file is fsynced before the rename and the directory after it: without
    both, a power cut can leave an empty file under the new name (reliability.md §1.1).
    """
    import tempfile  # here: a cold `fm-edge run` never writes a file this way

    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        _remove_quietly(tmp)
        raise storage_error(exc, path) from exc


def fsync_dir(directory):
    """Make a rename or unlink in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path, mode=0o700):
    """Create ``path`` if needed and check it is writable; one clear error otherwise."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(f"directory {path} is not writable by this user: fix its "
                           "permissions or choose another data dir with --data-dir or "
                           "FLOWMASON_EDGE_DATA_DIR")
    return path


def free_bytes(path):
    """Bytes available to this user on the filesystem holding ``path``."""
    if not hasattr(os, "statvfs"):
        import shutil

        return shutil.disk_usage(path).free
    stats = os.statvfs(path)      # what shutil.disk_usage does, without importing shutil
    return stats.f_bavail * stats.f_frsize


def storage_error(exc, path):
    """Turn an OSError into a StorageError that says what to do about it."""
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on the device holding {path}: free some space "
                            "(fm-edge clear-cache, or delete other files)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {exc.strerror}; fix its permissions or "
                            "choose another data dir with --data-dir or FLOWMASON_EDGE_DATA_DIR")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}")


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
