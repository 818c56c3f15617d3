"""The device's identity: an id generated once and kept in the data dir."""

import os
import socket
import uuid

from .errors import StorageError
from .fsutil import atomic_write

DEVICE_ID_FILE = "device_id"


def ensure_device_id(config):
    """Return the configured device id, or the one kept in ``data_dir`` (made on first use)."""
    if config.device_id:
        return config.device_id
    path = os.path.join(config.data_dir, DEVICE_ID_FILE)
    existing = _read(path)
    if existing:
        return existing
    new_id = "edge-" + uuid.uuid4().hex[:16]
    atomic_write(path, (new_id + "\n").encode("ascii"), mode=0o644)
    return _read(path) or new_id


def device_name(config):
    return config.device_name or socket.gethostname()


def _read(path):
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read the device id in {path}: {exc}; delete the file "
                           "and fm-edge makes a new id") from exc
