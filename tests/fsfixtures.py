"""Small real filesystems for disk-full and read-only tests (tmpfs mounts, as root)."""

import contextlib
import os
import subprocess
import tempfile


def can_mount():
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def tmpfs(size="1m", read_only=False):
    """Mount a tmpfs of ``size`` on a temp dir; yields its path; unmounts afterwards."""
    path = tempfile.mkdtemp(prefix="fm-edge-tmpfs-")
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


@contextlib.contextmanager
def unwritable_dir():
    """A directory this process cannot write: a read-only tmpfs as root, else chmod 500."""
    if can_mount():
        with tmpfs(read_only=True) as path:
            yield path
        return
    path = tempfile.mkdtemp(prefix="fm-edge-ro-")
    os.chmod(path, 0o500)
    try:
        yield path
    finally:
        os.chmod(path, 0o700)
        os.rmdir(path)
