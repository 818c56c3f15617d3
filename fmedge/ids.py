"""Validation of the ids that become SQLite keys, URL parts and file names."""

import os
import random
import re

from .defaults import MAX_ID_LENGTH
from .errors import InvalidIdError

# Letters, digits, '.', '_', '-'; starts with a letter or digit; '..' never allowed. This
# keeps ids safe as file names inside bundles and as URL path segments (CVE-2024-37032 was
# a path traversal through an unchecked id).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def validate_id(value, kind="pipeline"):
    """Return ``value`` if it is a safe id, else raise InvalidIdError naming the problem."""
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} id must be text, got {type(value).__name__}")
    problem = _problem(value)
    if problem:
        raise InvalidIdError(f"invalid {kind} id {_shown(value)}: {problem}; use letters, "
                             f"digits, '.', '_' and '-' (at most {MAX_ID_LENGTH} characters, "
                             "starting with a letter or digit)")
    return value


def is_valid_id(value):
    return isinstance(value, str) and not _problem(value)


def _problem(value):
    if not value:
        return "it is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"it is {len(value)} characters long"
    if "\x00" in value:
        return "it contains a NUL character"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if ".." in value:
        return "it contains '..'"
    if not _ID_RE.match(value):
        return "it contains characters that are not allowed"
    return ""


def _shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def new_run_id():
    """A fresh run id: 32 random hex digits, like ``uuid4().hex``.

    Drawn from a generator seeded once from os.urandom (and again in a forked child)
    rather than from os.urandom each time: that system call gives up the GIL, and under
    load the thread then waits behind every other one to get it back. Run ids must be
    unique, not secret: reading a run's result needs the API token anyway.
    """
    return "%032x" % _run_ids.getrandbits(128)


def _reseed():
    _run_ids.seed(os.urandom(32))


_run_ids = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)
