"""The fm-edge bundle format, and the one-pass reader that checks a bundle.

A bundle is one tar archive (gzip-compressed, or plain when its name ends in ``.tar``).
Its members come in a fixed order, so the same content always gives the same archive
layout and the reader can check every byte before anything is kept:

    manifest.json            always first
    manifest.sig             second, only when the bundle is signed
    pipelines/<id>.json      sorted by id: the canonical JSON of each document
    models/<name>.gguf       sorted by name
    results/results.jsonl    pending results, one JSON object a line (for the cloud)

``manifest.json``::

    {"format": "fm-edge-bundle", "format_version": 1, "fm_edge_version": "0.1.0",
     "created_at": "2024-05-01T12:00:00Z", "device_id": "edge-...",
     "members":   [{"path", "size", "sha256"}, ...],   # every member after the manifest
     "pipelines": [{"id", "version", "sha256", "source", "cloud_etag", "path"}, ...],
     "models":    [{"name", "size", "sha256", "path"}, ...],
     "results":   {"count", "path"} or null}

A pipeline's ``sha256`` is the pipeline cache's (sha256 of the canonical JSON), which is
also the sha256 of its member, since the member holds exactly that canonical text.
``cloud_etag`` is the ETag the cloud served that document under, when the exporting device
knows it: the importing device records it so a later sync gets "304 unchanged".

``manifest.sig`` is ``hmac-sha256:<64 hex>`` plus a newline: the HMAC-SHA256 of the exact
bytes of ``manifest.json`` under the configured ``bundle_key``. Every member is covered
through its sha256 in the manifest.

The reader never extracts by member name: names are only compared with the manifest's
list, so ``../``, absolute paths, links and device files are refused, never followed
(reliability.md §3.9; zip-slip, CVE-2024-45436).
"""

import hashlib
import hmac
import itertools
import re
import tarfile
import zlib

from .errors import InvalidIdError, UsageError
from .ids import validate_id
from .strict_json import loads_strict

FORMAT = "fm-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
RESULTS_PATH = "results/results.jsonl"
SIGNATURE_PREFIX = "hmac-sha256:"

MAX_MANIFEST_BYTES = 16 * 1024 * 1024    # a manifest lists files; it is never this big
MAX_SIGNATURE_BYTES = 256
MAX_PIPELINE_BYTES = 8 * 1024 * 1024     # the studio's limit on one pipeline document
CHUNK = 1024 * 1024

_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_SIGNATURE_RE = re.compile(re.escape(SIGNATURE_PREFIX) + r"([0-9a-f]{64})\n?\Z")
# The studio's device id rule (ids plus ':'); the id only labels where results came from.
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
# Tar errors from a damaged or hostile archive (BadGzipFile is an OSError).
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def pipeline_member(pipeline_id):
    return "pipelines/%s.json" % pipeline_id


def model_member(name):
    return "models/%s.gguf" % name


def invalid(bundle, problem, code="invalid_bundle"):
    """The error for a bundle that is refused: nothing was changed."""
    return UsageError("bundle %s refused, nothing was imported: %s" % (bundle, problem),
                      code=code)


# -- signing ---------------------------------------------------------------------------------

def signature_for(manifest_bytes, key):
    digest = hmac.new(key.encode("utf-8"), manifest_bytes, hashlib.sha256).hexdigest()
    return (SIGNATURE_PREFIX + digest + "\n").encode("ascii")


def check_signature(bundle, manifest_bytes, signature, key):
    """'verified', 'unsigned' or 'not_checked'; raises when a key is set and it fails."""
    if not key:
        return "not_checked" if signature is not None else "unsigned"
    if signature is None:
        raise invalid(bundle, "it is not signed, and this device has a bundle_key, so it "
                      "only imports bundles signed with that key: export it again from a "
                      "device with the same bundle_key", code="bundle_unsigned")
    match = _SIGNATURE_RE.match(signature.decode("ascii", "replace"))
    expected = signature_for(manifest_bytes, key).decode("ascii")[len(SIGNATURE_PREFIX):-1]
    if match is None or not hmac.compare_digest(match.group(1), expected):
        raise invalid(bundle, "its signature does not match this device's bundle_key: the "
                      "bundle was changed after it was signed, or signed with another key",
                      code="bad_signature")
    return "verified"


# -- the manifest ----------------------------------------------------------------------------

def strict_json(data, what):
    """JSON that refuses duplicate keys and NaN/Infinity (two parsers must agree on it)."""
    return loads_strict(data, what)


def parse_manifest(bundle, data):
    """The manifest as a dict, every field checked; ``members`` becomes {path: entry}."""
    try:
        manifest = strict_json(data, MANIFEST)
        _check_header(manifest)
        members = _members(manifest.get("members"))
        manifest["members"] = members
        used = _check_pipelines(manifest.get("pipelines"), members)
        used += _check_models(manifest.get("models"), members)
        used += _check_results(manifest.get("results"), members)
    except (ValueError, TypeError, InvalidIdError) as exc:
        raise invalid(bundle, "its manifest is not usable: %s" % exc) from None
    orphans = sorted(set(members) - set(used))
    if orphans:
        raise invalid(bundle, "its manifest lists members that are neither pipelines, models "
                      "nor results: %s" % ", ".join(orphans))
    return manifest


def _check_header(manifest):
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError("it is not an %s manifest (no \"format\": %r)" % (FORMAT, FORMAT))
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError("format_version %r is not a positive integer" % (version,))
    if version > FORMAT_VERSION:
        raise ValueError("it uses bundle format %d, and this fm-edge reads format %d: "
                         "upgrade fm-edge on this device" % (version, FORMAT_VERSION))
    device_id = manifest.get("device_id")
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
        raise ValueError("device_id %r is not a device id" % (device_id,))


def _members(entries):
    if not isinstance(entries, list):
        raise ValueError('"members" must be a list')
    members = {}
    for entry in entries:
        path = _field(entry, "path", str)
        if path in members or path in (MANIFEST, SIGNATURE):
            raise ValueError("the member %r is listed twice" % path)
        size = _field(entry, "size", int)
        if isinstance(size, bool) or size < 0:
            raise ValueError("member %s has size %r" % (path, size))
        members[path] = {"path": path, "size": size, "sha256": _sha(entry, path)}
    return members


def _check_pipelines(entries, members):
    used = []
    for entry in _list(entries, "pipelines"):
        pipeline_id = validate_id(_field(entry, "id", str), "pipeline")
        path = _member_of(entry, pipeline_member(pipeline_id), members)
        if members[path]["size"] > MAX_PIPELINE_BYTES:
            raise ValueError("pipeline %s is %d bytes; the limit is %d" % (
                pipeline_id, members[path]["size"], MAX_PIPELINE_BYTES))
        if _sha(entry, pipeline_id) != members[path]["sha256"]:
            raise ValueError("pipeline %s: its sha256 differs from its member's" % pipeline_id)
        _field(entry, "version", str)
        etag = entry.get("cloud_etag")
        if etag is not None and not (isinstance(etag, str) and etag.isprintable() and
                                     len(etag) <= 255):
            raise ValueError("pipeline %s: cloud_etag %r is not an ETag" % (pipeline_id, etag))
        used.append(path)
    return _unique(used)


def _check_models(entries, members):
    used = []
    for entry in _list(entries, "models"):
        name = validate_id(_field(entry, "name", str), "model")
        path = _member_of(entry, model_member(name), members)
        if _sha(entry, name) != members[path]["sha256"] or \
                _field(entry, "size", int) != members[path]["size"]:
            raise ValueError("model %s: its size or sha256 differs from its member's" % name)
        used.append(path)
    return _unique(used)


def _unique(paths):
    if len(set(paths)) != len(paths):
        raise ValueError("a pipeline or model is listed twice")
    return paths


def _check_results(entry, members):
    if entry is None:
        return []
    count = _field(entry, "count", int)
    if isinstance(count, bool) or count < 0:
        raise ValueError("results count %r is not a count" % (count,))
    return [_member_of(entry, RESULTS_PATH, members)]


def _member_of(entry, expected, members):
    path = _field(entry, "path", str)
    if path != expected:
        raise ValueError("member path %r should be %r" % (path, expected))
    if path not in members:
        raise ValueError("%s is not listed in \"members\"" % path)
    return path


def _list(value, name):
    if not isinstance(value, list):
        raise ValueError('"%s" must be a list' % name)
    return value


def _field(entry, name, kind):
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kind):
        raise ValueError("%r needs a %s field %r" % (entry, kind.__name__, name))
    return value


def _sha(entry, what):
    value = _field(entry, "sha256", str)
    if not _SHA256_RE.match(value):
        raise ValueError("%s: sha256 %r is not 64 lowercase hex digits" % (what, value))
    return value


# -- writing ---------------------------------------------------------------------------------

def member_header(path, size, mtime):
    """A plain file entry with nothing that varies between machines (owner, mode)."""
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class HashingReader:
    """Reads a file for tarfile while hashing what it reads."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size=-1):
        data = self.handle.read(size)
        self.digest.update(data)
        return data


class HashingWriter:
    """Writes to ``raw`` while hashing and counting (the bundle's own sha256 and size)."""

    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


# -- reading ---------------------------------------------------------------------------------

def member_problem(member):
    """Why a tar entry is refused whatever its name ('' when it is a plain file)."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a path that climbs out of the bundle ('..')"
    if member.issym():
        return "a symbolic link (to %r)" % member.linkname
    if member.islnk():
        return "a hard link (to %r)" % member.linkname
    if member.ischr() or member.isblk() or member.isfifo():
        return "a device file or FIFO"
    if member.isdir():
        return "a directory"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return "an unsupported tar entry type %r" % member.type
    return ""


def read_bundle(bundle, key, on_manifest, sink_for):
    """Check a bundle in one pass; returns (manifest, signature state).

    ``on_manifest(manifest)`` runs once the manifest is trusted, before any member data is
    read (space and id checks go there). ``sink_for(path)`` returns an object with
    ``write`` for each member's bytes; a member is checked (size, sha256) as it streams.
    Raises UsageError (code ``invalid_bundle``, ``bad_signature``, ``bundle_unsigned``).
    """
    try:
        with tarfile.open(bundle, "r|*") as tar:
            return _read_tar(bundle, tar, key, on_manifest, sink_for)
    except _READ_ERRORS as exc:
        raise invalid(bundle, "it is damaged or not an fm-edge bundle (%s)" % (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)) from None


def _read_tar(bundle, tar, key, on_manifest, sink_for):
    entries = iter(tar)
    first = next(entries, None)
    if first is None or first.name != MANIFEST or member_problem(first):
        raise invalid(bundle, "its first member must be the file %s" % MANIFEST)
    manifest_bytes = _read_small(bundle, tar, first, MAX_MANIFEST_BYTES)
    second = next(entries, None)
    signature = None
    if second is not None and second.name == SIGNATURE and not member_problem(second):
        signature = _read_small(bundle, tar, second, MAX_SIGNATURE_BYTES)
        second = None
    state = check_signature(bundle, manifest_bytes, signature, key)
    manifest = parse_manifest(bundle, manifest_bytes)
    on_manifest(manifest)
    rest = itertools.chain([second] if second is not None else [], entries)
    _read_members(bundle, tar, rest, manifest["members"], sink_for)
    return manifest, state


def _read_members(bundle, tar, entries, listed, sink_for):
    seen = set()
    for member in entries:
        expected = _expected(bundle, member, listed, seen)
        _copy_checked(bundle, tar.extractfile(member), expected, sink_for(member.name))
        seen.add(member.name)
    missing = sorted(set(listed) - seen)
    if missing:
        raise invalid(bundle, "members listed in its manifest are missing: %s"
                      % ", ".join(missing))


def _expected(bundle, member, listed, seen):
    problem = member_problem(member)
    if problem:
        raise invalid(bundle, "the member %r is %s" % (member.name, problem))
    if member.name in seen or member.name in (MANIFEST, SIGNATURE):
        raise invalid(bundle, "the member %r appears twice" % member.name)
    expected = listed.get(member.name)
    if expected is None:
        raise invalid(bundle, "the member %r is not listed in its manifest" % member.name)
    if member.size != expected["size"]:
        raise invalid(bundle, "the member %s is %d bytes, its manifest says %d" % (
            member.name, member.size, expected["size"]))
    return expected


def _copy_checked(bundle, stream, expected, sink):
    digest = hashlib.sha256()
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        digest.update(chunk)
        sink.write(chunk)
    if digest.hexdigest() != expected["sha256"]:
        raise invalid(bundle, "the member %s does not match the sha256 in its manifest: it "
                      "was changed or damaged after export" % expected["path"])


def _read_small(bundle, tar, member, limit):
    if member.size > limit:
        raise invalid(bundle, "its %s is %d bytes; the limit is %d" % (
            member.name, member.size, limit))
    return tar.extractfile(member).read()


class NullSink:
    """For members that are checked but not kept."""

    def write(self, data):
        return len(data)
