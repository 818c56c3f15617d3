#!/usr/bin/env python3
"""A small FlowMason-Studio-compatible cloud: the server side of fm-edge's sync protocol.

This is what the tests, the benchmarks and a new user's demo talk to (design.md §8). It is
a real HTTP server (stdlib ``ThreadingHTTPServer`` + SQLite), not a mock: results are
de-duplicated permanently by ``run_id``, batches are replayed by ``Idempotency-Key``,
pipelines carry a changes feed and ETags, models are served with HTTP Range.

Serve (no sub-command)::

    python3 tools/studio.py --port 8999 --db studio.db --api-key KEY \
        [--host 127.0.0.1] [--tls-cert cert.pem --tls-key key.pem] [--fault-api]

``--port 0`` picks a free port; the first line on stdout names the URL either way.
The key may come from ``STUDIO_API_KEY`` instead of ``--api-key`` (keeps it out of ``ps``).

Admin (works while the server runs: SQLite WAL lets both processes share the file)::

    python3 tools/studio.py push FILE [--id ID] [--db studio.db]
    python3 tools/studio.py delete ID [--db studio.db]
    python3 tools/studio.py add-model NAME FILE [--db studio.db]
    python3 tools/studio.py import-bundle BUNDLE [--key KEY] [--json] [--db studio.db]
    python3 tools/studio.py pipelines [--json] [--db studio.db]
    python3 tools/studio.py results [--json] [--db studio.db]
    python3 tools/studio.py devices [--json] [--db studio.db]

Tests start it in-process with ``serve_in_thread()`` and steer failures with
``server.faults`` (see ``Faults``). Stdlib only; Python 3.9 compatible.
"""

import argparse
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import sys
import tarfile
import tempfile
import threading
import urllib.parse
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_PREFIX = "/api/v1/edge"
STUDIO_VERSION = "0.1.0"

# -- Protocol limits (design.md §8) ---------------------------------------------------------
MAX_BATCH_RESULTS = 500
MAX_BATCH_BYTES = 1024 * 1024            # a results body as sent (compressed or not)
MAX_BATCH_JSON_BYTES = 16 * 1024 * 1024  # after gunzip: stops a gzip bomb
MAX_SMALL_BODY_BYTES = 64 * 1024         # register / heartbeat / fault api
MAX_PIPELINE_BYTES = 8 * 1024 * 1024     # a pushed pipeline document
MAX_IDEMPOTENCY_KEY = 255                # Stripe's bound
MAX_CHANGES_PAGE = 1000
DEFAULT_CHANGES_PAGE = 500
HANDLER_TIMEOUT = 30                     # seconds a client may stay silent mid-request

# A finished run is the only thing a device uploads; pending/running are not results.
FINAL_STATUSES = ("completed", "failed", "cancelled", "timeout", "interrupted")

# The same rule as fmedge/ids.py: safe as a SQLite key, a URL segment and a file name.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


class StudioError(Exception):
    """An answer other than success: HTTP status, stable code, a message naming the fix."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_id(value, kind):
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise StudioError(400, "invalid_id",
                          "invalid %s id %r: use letters, digits, '.', '_' and '-' (at most "
                          "128 characters, starting with a letter or digit, no '..')"
                          % (kind, value))
    return value


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def strict_json_loads(data):
    """json.loads that refuses NaN/Infinity (the stdlib accepts them by default)."""
    return json.loads(data, parse_constant=_reject_constant)


def _dumps(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# ============================================================================================
# Storage
# ============================================================================================

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    revision INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    document BLOB,
    deleted INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL UNIQUE,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    name TEXT,
    version TEXT,
    platform TEXT,
    info TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    last_heartbeat TEXT,
    heartbeat TEXT
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    status TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    device_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    device_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (device_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    added_at TEXT NOT NULL
);
"""


class StudioStore:
    """All of the studio's state in one SQLite file (+ a folder of model blobs beside it).

    One connection behind a lock: the studio is a test and demo server, and serialising
    writes keeps the de-duplication obviously correct. WAL lets the admin CLI write while
    a server process reads. ``synchronous=FULL``: a result acknowledged is a result kept.
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.blob_dir = os.path.splitext(self.path)[0] + "-models"
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=5, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._conn.executescript(SCHEMA)

    def close(self):
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self):
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _rows(self, sql, params=()):
        with self._lock:
            return [dict(row) for row in self._conn.execute(sql, params).fetchall()]

    # -- pipelines ---------------------------------------------------------------------------

    def push_pipeline(self, document_bytes, pipeline_id=None):
        """Add or update a pipeline; an unchanged document makes no new change."""
        document = _parse_pipeline(document_bytes)
        pipeline_id = pipeline_id or document.get("id") or document.get("name")
        if pipeline_id is None:
            raise StudioError(400, "invalid_id", "the pipeline document has neither an id nor "
                              "a name: add one, or pass --id")
        _check_id(pipeline_id, "pipeline")
        sha = hashlib.sha256(document_bytes).hexdigest()
        with self._transaction() as conn:
            old = conn.execute("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
            if old is not None and not old["deleted"] and old["sha256"] == sha:
                return dict(_pipeline_entry(old), changed=False)
            revision = (old["revision"] if old is not None else 0) + 1
            version = document.get("version")
            version = str(version) if version not in (None, "") else str(revision)
            seq = _next_seq(conn)
            conn.execute("INSERT OR REPLACE INTO pipelines (id, version, revision, sha256, "
                         "document, deleted, seq, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                         (pipeline_id, version, revision, sha, document_bytes, seq, _now_iso()))
        return {"id": pipeline_id, "version": version, "revision": revision, "sha256": sha,
                "deleted": False, "seq": seq, "changed": True}

    def delete_pipeline(self, pipeline_id):
        """Tombstone a pipeline: it stays in the changes feed as ``deleted: true``."""
        with self._transaction() as conn:
            old = conn.execute("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
            if old is None or old["deleted"]:
                raise StudioError(404, "not_found", "no pipeline %r to delete: `python3 "
                                  "tools/studio.py pipelines` lists them" % pipeline_id)
            seq = _next_seq(conn)
            conn.execute("UPDATE pipelines SET deleted = 1, document = NULL, seq = ?, "
                         "updated_at = ? WHERE id = ?", (seq, _now_iso(), pipeline_id))
        return {"id": pipeline_id, "deleted": True, "seq": seq}

    def latest_seq(self):
        return self._rows("SELECT COALESCE(MAX(seq), 0) AS top FROM pipelines")[0]["top"]

    def pipeline_changes(self, since, limit):
        """Changes after cursor ``since``: the latest state of each changed pipeline."""
        # A cursor from the future means the studio's db was replaced: start over rather
        # than leave the device waiting forever for a sequence number that never comes.
        reset = since > self.latest_seq()
        if reset:
            since = 0
        rows = self._rows("SELECT * FROM pipelines WHERE seq > ? ORDER BY seq LIMIT ?",
                          (since, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = rows[-1]["seq"] if rows else since
        return {"changes": [_pipeline_entry(row) for row in rows], "cursor": cursor,
                "more": more, "reset": reset}

    def get_pipeline(self, pipeline_id):
        rows = self._rows("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,))
        if not rows:
            raise StudioError(404, "not_found", "no pipeline %r on this studio: push it with "
                              "`python3 tools/studio.py push FILE`" % pipeline_id)
        if rows[0]["deleted"]:
            raise StudioError(404, "not_found", "pipeline %r was deleted from this studio"
                              % pipeline_id)
        return rows[0]

    def list_pipelines(self):
        return [_pipeline_entry(row) for row in
                self._rows("SELECT * FROM pipelines ORDER BY id")]

    # -- devices -----------------------------------------------------------------------------

    def register_device(self, device_id, info):
        now = _now_iso()
        with self._transaction() as conn:
            # Re-registering updates the description, keeps the first registration time.
            conn.execute("INSERT INTO devices (device_id, name, version, platform, info, "
                         "registered_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO "
                         "UPDATE SET name = excluded.name, version = excluded.version, "
                         "platform = excluded.platform, info = excluded.info",
                         (device_id, _text(info.get("name")), _text(info.get("version")),
                          _text(info.get("platform")), _dumps(info), now))
            registered_at = conn.execute("SELECT registered_at FROM devices WHERE "
                                         "device_id = ?", (device_id,)).fetchone()[0]
        return {"device_id": device_id, "registered_at": registered_at}

    def record_heartbeat(self, device_id, payload):
        now = _now_iso()
        with self._transaction() as conn:
            updated = conn.execute("UPDATE devices SET last_heartbeat = ?, heartbeat = ? "
                                   "WHERE device_id = ?", (now, _dumps(payload), device_id))
            if updated.rowcount == 0:
                raise StudioError(404, "not_found", "device %r is not registered: POST "
                                  "/devices/register first" % device_id)
        return now

    def list_devices(self):
        devices = self._rows("SELECT * FROM devices ORDER BY device_id")
        for device in devices:
            device["info"] = json.loads(device["info"])
            device["heartbeat"] = json.loads(device["heartbeat"]) if device["heartbeat"] else None
        return devices

    # -- results -----------------------------------------------------------------------------

    def ingest_results(self, device_id, key, request_sha256, items, poison=()):
        """Store a batch once; answer per item. Returns (answer, replayed)."""
        now = _now_iso()
        with self._transaction() as conn:
            answer = _replayed_answer(conn, device_id, key, request_sha256)
            replayed = answer is not None
            if not replayed:
                answer = _store_items(conn, device_id, items, now, poison)
                conn.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?)",
                             (device_id, key, request_sha256, _dumps(answer), now))
            for item in items:   # the wire ledger: every item received, duplicates included
                run_id = item.get("run_id") if isinstance(item, dict) else None
                conn.execute("INSERT INTO deliveries (run_id, device_id, idempotency_key, "
                             "received_at) VALUES (?, ?, ?, ?)",
                             (run_id if isinstance(run_id, str) else None, device_id, key, now))
        return answer, replayed

    def list_results(self):
        rows = self._rows("SELECT * FROM results ORDER BY received_at, run_id")
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    def count_deliveries(self):
        return self._rows("SELECT COUNT(*) AS n FROM deliveries")[0]["n"]

    # -- models ------------------------------------------------------------------------------

    def add_model(self, name, source_path):
        """Copy a model file into the blob folder (named by its sha256) and record it."""
        _check_id(name, "model")
        os.makedirs(self.blob_dir, exist_ok=True)
        sha, size, tmp_path = _copy_hashing(source_path, self.blob_dir)
        os.replace(tmp_path, os.path.join(self.blob_dir, sha))
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO models (name, size, sha256, added_at) "
                         "VALUES (?, ?, ?, ?)", (name, size, sha, _now_iso()))
        return {"name": name, "size": size, "sha256": sha}

    def get_model(self, name):
        rows = self._rows("SELECT name, size, sha256 FROM models WHERE name = ?", (name,))
        if not rows:
            raise StudioError(404, "not_found", "no model %r on this studio: add it with "
                              "`python3 tools/studio.py add-model NAME FILE`" % name)
        return rows[0]

    def model_path(self, model):
        return os.path.join(self.blob_dir, model["sha256"])


def _text(value):
    return None if value is None else str(value)


def _next_seq(conn):
    return conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM pipelines").fetchone()[0]


def _pipeline_entry(row):
    return {"id": row["id"], "version": row["version"], "revision": row["revision"],
            "sha256": row["sha256"], "deleted": bool(row["deleted"]), "seq": row["seq"]}


def _parse_pipeline(document_bytes):
    if len(document_bytes) > MAX_PIPELINE_BYTES:
        raise StudioError(413, "too_large", "pipeline document is %d bytes; the limit is %d"
                          % (len(document_bytes), MAX_PIPELINE_BYTES))
    try:
        document = strict_json_loads(document_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise StudioError(400, "invalid_pipeline", "pipeline document is not valid JSON: %s"
                          % exc)
    if not isinstance(document, dict):
        raise StudioError(400, "invalid_pipeline", "pipeline document must be a JSON object")
    return document


def _replayed_answer(conn, device_id, key, request_sha256):
    row = conn.execute("SELECT request_sha256, response FROM idempotency WHERE device_id = ? "
                       "AND idempotency_key = ?", (device_id, key)).fetchone()
    if row is None:
        return None
    if row["request_sha256"] != request_sha256:
        raise StudioError(422, "idempotency_key_reused",
                          "Idempotency-Key %r was already used by device %r for a different "
                          "batch: use a new key for new content" % (key, device_id))
    return json.loads(row["response"])


def _store_items(conn, device_id, items, now, poison):
    answer = {"accepted": [], "duplicate": [], "rejected": []}
    for index, item in enumerate(items):
        reason = result_problem(item) or _poison_reason(item, poison)
        if reason:
            run_id = item.get("run_id") if isinstance(item, dict) else None
            answer["rejected"].append({"index": index, "reason": reason,
                                       "run_id": run_id if isinstance(run_id, str) else None})
            continue
        inserted = conn.execute(
            "INSERT OR IGNORE INTO results (run_id, pipeline_id, status, device_id, "
            "received_at, payload) VALUES (?, ?, ?, ?, ?, ?)",
            (item["run_id"], item["pipeline_id"], item["status"], device_id, now, _dumps(item)))
        answer["accepted" if inserted.rowcount == 1 else "duplicate"].append(item["run_id"])
    return answer


def _poison_reason(item, poison):
    if item["run_id"] in poison:
        return "run_id %r is marked poison on this studio (test fault)" % item["run_id"]
    return ""


def result_problem(item):
    """Why a result cannot be stored, or '' when it can."""
    if not isinstance(item, dict):
        return "result is not a JSON object"
    for field in ("run_id", "pipeline_id", "status"):
        value = item.get(field)
        if value is None or value == "":
            return "missing %s" % field
        if not isinstance(value, str):
            return "%s must be a string, got %s" % (field, type(value).__name__)
    if len(item["run_id"]) > 128:
        return "run_id is %d characters long; the limit is 128" % len(item["run_id"])
    if item["status"] not in FINAL_STATUSES:
        return "status %r is not a finished run's status (one of %s)" % (
            item["status"], ", ".join(FINAL_STATUSES))
    return ""


def _copy_hashing(source_path, folder):
    digest = hashlib.sha256()
    size = 0
    fd, tmp_path = tempfile.mkstemp(dir=folder, suffix=".partial")
    with os.fdopen(fd, "wb") as out, open(source_path, "rb") as src:
        for chunk in iter(lambda: src.read(1024 * 1024), b""):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size, tmp_path


# ============================================================================================
# Fault hooks for tests
# ============================================================================================

class Faults:
    """Failures a test asks for, consumed request by request. Thread-safe.

    - ``fail(status, times, retry_after, path)``: answer ``status`` (e.g. 500, 429, 503)
      instead of handling the request, ``times`` times; ``Retry-After`` sent when given.
    - ``drop_after_commit(times, path)``: handle the request (commit included), then close
      the connection without answering: the ack is lost, the data is stored.
    - ``garbage(times, path)``: answer 200 with a body that is not JSON.
    - ``poison``: run ids the studio always rejects (a poison item).
    - ``ignore_range``: serve model files whole (200) even when a Range is asked for.

    ``path`` is matched as a substring of the path after ``/api/v1/edge`` (None = any).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._rules = []
        self.poison = set()
        self.ignore_range = False

    def fail(self, status, times=1, retry_after=None, path=None):
        self._add({"kind": "status", "status": int(status), "times": int(times),
                   "retry_after": retry_after, "path": path})

    def drop_after_commit(self, times=1, path=None):
        self._add({"kind": "drop", "times": int(times), "path": path})

    def garbage(self, times=1, path=None):
        self._add({"kind": "garbage", "times": int(times), "path": path})

    def clear(self):
        with self._lock:
            self._rules = []
            self.poison = set()
            self.ignore_range = False

    def take(self, path):
        """The first rule matching ``path`` (one use of it consumed), or None."""
        with self._lock:
            for rule in self._rules:
                if rule["path"] is None or rule["path"] in path:
                    rule["times"] -= 1
                    if rule["times"] <= 0:
                        self._rules.remove(rule)
                    return dict(rule)
        return None

    def _add(self, rule):
        with self._lock:
            self._rules.append(rule)

    def apply(self, spec):
        """Apply a JSON fault spec (the ``POST /_studio/faults`` body)."""
        if not isinstance(spec, dict):
            raise StudioError(400, "bad_request", 'a fault spec is {"action": ..., ...}')
        try:
            self._apply(spec.get("action"), {k: v for k, v in spec.items() if k != "action"})
        except (TypeError, ValueError) as exc:
            raise StudioError(400, "bad_request", "bad fault spec %r: %s" % (spec, exc))

    def _apply(self, action, args):
        if action == "fail":
            self.fail(**args)
        elif action == "drop_after_commit":
            self.drop_after_commit(**args)
        elif action == "garbage":
            self.garbage(**args)
        elif action == "poison":
            self.poison.update(args.get("run_ids", []))
        elif action == "ignore_range":
            self.ignore_range = bool(args.get("enabled", True))
        elif action == "clear":
            self.clear()
        else:
            raise StudioError(400, "bad_request", "unknown fault action %r: use fail, "
                              "drop_after_commit, garbage, poison, ignore_range or clear"
                              % (action,))


# ============================================================================================
# HTTP
# ============================================================================================

class Reply:
    """A response ready to send: status, headers, and bytes or an open file to stream."""

    def __init__(self, status, body=b"", headers=None, stream=None, length=0):
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.stream = stream      # (file object, byte count) for model files
        self.length = length


def json_reply(status, obj, headers=None):
    body = json.dumps(obj, sort_keys=True).encode("utf-8")
    merged = {"Content-Type": "application/json"}
    merged.update(headers or {})
    return Reply(status, body, merged)


def error_reply(err):
    return json_reply(err.status, {"error": {"code": err.code, "message": err.message}},
                      err.headers)


ROUTES = [
    ("GET", re.compile(r"/ping\Z"), "ping"),
    ("POST", re.compile(r"/devices/register\Z"), "register"),
    ("POST", re.compile(r"/devices/(?P<device_id>[^/]+)/heartbeat\Z"), "heartbeat"),
    ("GET", re.compile(r"/pipelines\Z"), "changes"),
    ("GET", re.compile(r"/pipelines/(?P<pipeline_id>[^/]+)\Z"), "pipeline"),
    ("POST", re.compile(r"/results\Z"), "results"),
    ("GET", re.compile(r"/models/(?P<name>[^/]+)\Z"), "model_manifest"),
    ("GET", re.compile(r"/models/(?P<name>[^/]+)/file\Z"), "model_file"),
]


class StudioHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: devices reuse connections
    server_version = "fm-edge-studio/" + STUDIO_VERSION
    timeout = HANDLER_TIMEOUT       # a silent client cannot hold a thread forever
    # Headers and body go out in two writes; without this a small reply waits ~40 ms on
    # the client's delayed ACK.
    disable_nagle_algorithm = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write("studio: %s %s\n" % (self.address_string(), fmt % args))

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, method):
        self._body_read = False
        path = urllib.parse.urlsplit(self.path).path
        try:
            reply, drop = self._route(method, path)
        except StudioError as err:
            reply, drop = error_reply(err), False
        except Exception as exc:   # one line, not a traceback per request
            sys.stderr.write("studio: internal error on %s %s: %r\n" % (method, path, exc))
            reply, drop = error_reply(StudioError(500, "internal", "studio bug: %r" % exc)), False
        self.server.log_request_done(method, path, reply.status, self.headers)
        if drop:
            self._drop_connection()
            return
        self._send(reply)

    def _route(self, method, path):
        if path == "/_studio/faults" and self.server.fault_api:
            self._authenticate()
            self.server.faults.apply(self._read_json(MAX_SMALL_BODY_BYTES))
            return json_reply(200, {"ok": True}), False
        if not path.startswith(API_PREFIX + "/"):
            raise StudioError(404, "not_found", "no endpoint %s: the edge API lives under %s"
                              % (path, API_PREFIX))
        sub = path[len(API_PREFIX):]
        name, params = _match_route(method, sub)
        self._authenticate()
        self.device_id = self._device_id()
        rule = self.server.faults.take(sub)
        if rule is not None and rule["kind"] == "status":
            return self._fault_reply(rule), False
        reply = getattr(self, "handle_" + name)(**params)
        if rule is not None and rule["kind"] == "garbage":
            reply = Reply(200, b'{"accepted": [', {"Content-Type": "application/json"})
        return reply, rule is not None and rule["kind"] == "drop"

    def _fault_reply(self, rule):
        headers = {}
        if rule["retry_after"] is not None:
            headers["Retry-After"] = str(rule["retry_after"])
        self.close_connection = True   # the body (if any) was not read
        return error_reply(StudioError(rule["status"], "injected_fault",
                                       "injected fault: HTTP %d" % rule["status"], headers))

    # -- request helpers ---------------------------------------------------------------------

    def _authenticate(self):
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        expected = self.server.api_key.encode("utf-8")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"), expected):
            self.close_connection = True
            raise StudioError(401, "auth_failed",
                              "missing or wrong API key: send `Authorization: Bearer KEY` "
                              "with the key this studio was started with",
                              {"WWW-Authenticate": 'Bearer realm="fm-edge studio"'})

    def _device_id(self):
        device_id = self.headers.get("X-Device-Id", "")
        if not _DEVICE_ID_RE.match(device_id):
            self.close_connection = True
            raise StudioError(400, "bad_device_id",
                              "missing or invalid X-Device-Id header %r: send the device's id "
                              "(letters, digits, '.', '_', ':', '-')" % device_id)
        return device_id

    def _announces_body(self):
        length = self.headers.get("Content-Length", "0").strip()
        return "Transfer-Encoding" in self.headers or length not in ("", "0")

    def _read_body(self, limit):
        """The request body, refused before reading when it is too large or unframed."""
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise StudioError(411, "length_required", "chunked request bodies are not "
                              "supported: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise StudioError(411, "length_required", "send a Content-Length header")
        length = int(length)
        if length > limit:
            self.close_connection = True
            raise StudioError(413, "too_large", "request body is %d bytes; the limit here is "
                              "%d bytes" % (length, limit))
        try:
            data = self.rfile.read(length)
        except (socket.timeout, ConnectionError):
            data = b""   # a stalled or vanished client: answered below, connection closed
        if len(data) != length:
            self.close_connection = True
            raise StudioError(400, "bad_request", "request body ended after %d of %d bytes"
                              % (len(data), length))
        return data

    def _read_json(self, limit):
        data = self._read_body(limit)
        try:
            return strict_json_loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise StudioError(400, "bad_json", "request body is not valid JSON: %s" % exc)

    def _read_json_object(self, limit):
        payload = self._read_json(limit)
        if not isinstance(payload, dict):
            raise StudioError(400, "bad_json", "request body must be a JSON object")
        return payload

    # -- endpoints ---------------------------------------------------------------------------

    def handle_ping(self):
        return json_reply(200, {"ok": True, "server": "fm-edge-studio",
                                "version": STUDIO_VERSION, "time": _now_iso(),
                                "device_id": self.device_id})

    def handle_register(self):
        info = self._read_json_object(MAX_SMALL_BODY_BYTES)
        claimed = info.get("device_id", self.device_id)
        if claimed != self.device_id:
            raise StudioError(400, "bad_device_id", "body device_id %r does not match "
                              "X-Device-Id %r" % (claimed, self.device_id))
        info["device_id"] = self.device_id
        return json_reply(200, self.server.store.register_device(self.device_id, info))

    def handle_heartbeat(self, device_id):
        if device_id != self.device_id:
            raise StudioError(400, "bad_device_id", "heartbeat for device %r sent with "
                              "X-Device-Id %r: they must match" % (device_id, self.device_id))
        payload = self._read_json_object(MAX_SMALL_BODY_BYTES)
        received_at = self.server.store.record_heartbeat(device_id, payload)
        # The latest change number lets a device skip the changes call when it is current.
        return json_reply(200, {"ok": True, "received_at": received_at,
                                "pipelines_cursor": self.server.store.latest_seq()})

    def handle_changes(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        since = _int_param(query, "since", 0, 0, None)
        limit = _int_param(query, "limit", DEFAULT_CHANGES_PAGE, 1, MAX_CHANGES_PAGE)
        return json_reply(200, self.server.store.pipeline_changes(since, limit))

    def handle_pipeline(self, pipeline_id):
        row = self.server.store.get_pipeline(_check_id(pipeline_id, "pipeline"))
        etag = '"%s"' % row["sha256"]
        headers = {"ETag": etag, "X-Pipeline-Version": row["version"],
                   "X-Pipeline-Revision": str(row["revision"])}
        if _etag_matches(self.headers.get("If-None-Match"), row["sha256"]):
            return Reply(304, b"", headers)
        headers["Content-Type"] = "application/json"
        return Reply(200, bytes(row["document"]), headers)

    def handle_results(self):
        key = self._idempotency_key()
        raw = self._read_body(MAX_BATCH_BYTES)
        data = _decode_content(raw, self.headers.get("Content-Encoding", ""))
        items = _parse_batch(data)
        answer, replayed = self.server.store.ingest_results(
            self.device_id, key, hashlib.sha256(data).hexdigest(), items,
            frozenset(self.server.faults.poison))
        headers = {"Idempotent-Replayed": "true"} if replayed else {}
        return json_reply(200, answer, headers)

    def _idempotency_key(self):
        key = self.headers.get("Idempotency-Key", "").strip()
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            self.close_connection = True
            raise StudioError(400, "bad_idempotency_key",
                              "missing or invalid Idempotency-Key header: send one printable "
                              "key (e.g. a UUID, at most %d characters) per batch, and the same "
                              "key when resending that batch" % MAX_IDEMPOTENCY_KEY)
        return key

    def handle_model_manifest(self, name):
        model = self.server.store.get_model(_check_id(name, "model"))
        return json_reply(200, {"name": model["name"], "size": model["size"],
                                "sha256": model["sha256"],
                                "url": "%s/models/%s/file" % (API_PREFIX, model["name"])})

    def handle_model_file(self, name):
        model = self.server.store.get_model(_check_id(name, "model"))
        size = model["size"]
        headers = {"Accept-Ranges": "bytes", "ETag": '"%s"' % model["sha256"],
                   "Content-Type": "application/octet-stream"}
        wanted = self.headers.get("Range")
        if wanted and not self.server.faults.ignore_range and _if_range_holds(
                self.headers.get("If-Range"), model["sha256"]):
            start, end = _parse_range(wanted, size)
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, size)
            return _file_reply(206, self.server.store.model_path(model), start, end, headers)
        return _file_reply(200, self.server.store.model_path(model), 0, size - 1, headers)

    # -- sending -----------------------------------------------------------------------------

    def _send(self, reply):
        if not self._body_read and self._announces_body():
            self.close_connection = True   # an unread body would be taken for the next request
        self.send_response(reply.status)
        length = reply.length if reply.stream is not None else len(reply.body)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            if reply.stream is not None:
                self._send_file(reply.stream, reply.length)
            elif reply.body:
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True   # the client went away mid-body; nothing to do
        finally:
            if reply.stream is not None:
                reply.stream.close()

    def _send_file(self, stream, length):
        """``length`` bytes of ``stream`` from where it stands.

        sendfile(2) copies from the page cache to the socket in the kernel: a Python loop of
        64 KiB reads and writes cost the studio as much CPU as the client spent receiving.
        Over TLS, ``socket.sendfile`` falls back to sending in chunks itself.
        """
        sent = self.connection.sendfile(stream, stream.tell(), length)
        if sent != length:
            raise ConnectionResetError("model file shrank while being served")

    def _drop_connection(self):
        """Close without answering (the fault 'commit, then lose the ack')."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _match_route(method, sub):
    allowed = []
    for route_method, pattern, name in ROUTES:
        match = pattern.match(sub)
        if match:
            if route_method == method:
                params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
                return name, params
            allowed.append(route_method)
    if allowed:
        raise StudioError(405, "method_not_allowed", "%s is not allowed on %s%s: use %s"
                          % (method, API_PREFIX, sub, ", ".join(allowed)),
                          {"Allow": ", ".join(allowed)})
    raise StudioError(404, "not_found", "no endpoint %s%s" % (API_PREFIX, sub))


def _int_param(query, name, default, lowest, highest):
    values = query.get(name)
    if not values or values[0] == "":
        return default
    text = values[0]
    if not text.isdigit() or int(text) < lowest or (highest is not None and int(text) > highest):
        bound = "" if highest is None else " and at most %d" % highest
        raise StudioError(400, "bad_request", "query parameter %s=%r must be an integer of at "
                          "least %d%s" % (name, text, lowest, bound))
    return int(text)


def _etag_matches(header, sha):
    if not header:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == "*" or tag.strip('"') == sha:
            return True
    return False


def _if_range_holds(header, sha):
    """No If-Range, or one naming the current file: the Range may be honoured."""
    return not header or header.strip().strip('"') == sha


def _parse_range(header, size):
    """(start, end) inclusive for one ``bytes=`` range; 416 when it cannot be served."""
    unsatisfiable = {"Content-Range": "bytes */%d" % size}
    match = re.match(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z", header)
    if not match or match.group(1) + match.group(2) == "":
        raise StudioError(416, "bad_range", "Range %r is not one `bytes=START-[END]` range "
                          "(multiple ranges are not supported)" % header, unsatisfiable)
    first, last = match.group(1), match.group(2)
    if first == "":                       # bytes=-N: the last N bytes
        suffix = int(last)
        start, end = (max(0, size - suffix), size - 1) if suffix else (size, size)
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise StudioError(416, "bad_range", "Range %r is outside the file (%d bytes)"
                          % (header, size), unsatisfiable)
    return start, end


def _file_reply(status, path, start, end, headers):
    stream = open(path, "rb")
    stream.seek(start)
    return Reply(status, headers=headers, stream=stream, length=max(0, end - start + 1))


def _decode_content(raw, encoding):
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise StudioError(415, "unsupported_encoding", "Content-Encoding %r is not supported: "
                          "send gzip or nothing" % encoding)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, MAX_BATCH_JSON_BYTES + 1)
    except zlib.error as exc:
        raise StudioError(400, "bad_gzip", "request body is not valid gzip: %s" % exc)
    if len(data) > MAX_BATCH_JSON_BYTES:
        raise StudioError(413, "batch_too_large", "batch inflates past %d bytes: send fewer "
                          "results per batch" % MAX_BATCH_JSON_BYTES)
    if not inflater.eof:
        raise StudioError(400, "bad_gzip", "gzip body is truncated")
    return data


def _parse_batch(data):
    try:
        payload = strict_json_loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise StudioError(400, "bad_json", "results batch is not valid JSON: %s" % exc)
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise StudioError(400, "bad_json", 'results batch must be {"results": [...]}')
    items = payload["results"]
    if len(items) > MAX_BATCH_RESULTS:
        raise StudioError(413, "batch_too_large", "batch has %d results; the limit is %d: "
                          "split it" % (len(items), MAX_BATCH_RESULTS))
    return items


# Request headers kept in ``StudioServer.requests`` (never Authorization: it holds the key).
LOGGED_HEADERS = ("X-Device-Id", "User-Agent", "Idempotency-Key", "Content-Encoding", "Range",
                  "If-None-Match", "If-Range")


class StudioServer(ThreadingHTTPServer):
    """The HTTP server plus its store, key and fault hooks; TLS per connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, store, api_key, host="127.0.0.1", port=0, ssl_context=None,
                 fault_api=False, quiet=True):
        if not api_key:
            raise ValueError("the studio needs an API key (--api-key or STUDIO_API_KEY)")
        self.store = store
        self.api_key = api_key
        self.ssl_context = ssl_context
        self.fault_api = fault_api
        self.quiet = quiet
        self.faults = Faults()
        self.requests = []            # one dict per request handled: what tests inspect
        self._requests_lock = threading.Lock()
        self._connections = set()
        self._thread = None
        super().__init__((host, port), StudioHandler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "%s://%s:%d" % ("https" if self.ssl_context else "http", host, port)

    def log_request_done(self, method, path, status, headers):
        entry = {"method": method, "path": path, "status": status}
        for name in LOGGED_HEADERS:
            entry[name.lower()] = headers.get(name)
        with self._requests_lock:
            self.requests.append(entry)

    def finish_request(self, request, client_address):
        """Runs in the connection's own thread, so a slow TLS handshake blocks no one."""
        request.settimeout(HANDLER_TIMEOUT)
        conn = request
        if self.ssl_context is not None:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        with self._requests_lock:
            self._connections.add(conn)
        try:
            super().finish_request(conn, client_address)
        finally:
            with self._requests_lock:
                self._connections.discard(conn)
            if conn is not request:
                conn.close()   # socketserver only closes the plain socket it handed us

    def handle_error(self, request, client_address):
        # One line instead of socketserver's traceback (a refused TLS handshake lands here).
        if not self.quiet:
            sys.stderr.write("studio: connection from %s failed: %r\n"
                             % (client_address[0], sys.exc_info()[1]))

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="studio", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop accepting, drop open keep-alive connections, close the database."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        with self._requests_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def make_ssl_context(cert_file, key_file):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def serve_in_thread(db_path, api_key, host="127.0.0.1", port=0, tls_cert=None, tls_key=None,
                    fault_api=False, quiet=True):
    """Start a studio in a background thread; returns the server (``.url``, ``.stop()``)."""
    context = make_ssl_context(tls_cert, tls_key) if tls_cert else None
    server = StudioServer(StudioStore(db_path), api_key, host, port, context, fault_api, quiet)
    return server.start()


# ============================================================================================
# Bundles: results carried from an air-gapped device (fm-edge export --results)
# ============================================================================================

def import_bundle(store, path, key=None):
    """Ingest the results of an fm-edge bundle exactly as if the device had uploaded them.

    The bundle is checked first (manifest, HMAC-SHA256 signature when ``key`` is given,
    the results member's size and sha256; links and unlisted members refused); then its
    results go through ``ingest_results`` in batches, so they are de-duplicated by run_id
    against everything uploaded or imported before. Each import uses fresh Idempotency-Keys:
    importing the same bundle again answers "duplicate" rather than replaying "accepted".
    Pipelines and models in the bundle are for devices and are ignored here.
    """
    manifest, results = _bundle_results(path, key)
    device_id = manifest.get("device_id")
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
        raise StudioError(400, "invalid_bundle", "bundle %s names no valid device_id" % path)
    lines = [line for line in results.splitlines() if line.strip()]
    total = {"accepted": [], "duplicate": [], "rejected": []}
    run = uuid.uuid4().hex
    for start in range(0, len(lines), MAX_BATCH_RESULTS):
        items = []
        for line in lines[start:start + MAX_BATCH_RESULTS]:
            try:
                items.append(strict_json_loads(line.decode("utf-8")))
            except (UnicodeDecodeError, ValueError, RecursionError):
                items.append(None)   # rejected by ingest_results as "not a JSON object"
        key_name = "bundle-import-%s-%d" % (run, start // MAX_BATCH_RESULTS)
        answer, _ = store.ingest_results(device_id, key_name, hashlib.sha256(
            b"\n".join(lines[start:start + MAX_BATCH_RESULTS])).hexdigest(), items)
        for name in total:
            total[name].extend(answer[name])
    return {"bundle": os.path.abspath(path), "device_id": device_id, "results": len(lines),
            "accepted": len(total["accepted"]), "duplicate": len(total["duplicate"]),
            "rejected": total["rejected"]}


def _bundle_results(path, key):
    """(manifest, bytes of results/results.jsonl) after checking what they rest on."""
    def refuse(problem):
        return StudioError(400, "invalid_bundle", "bundle %s refused: %s" % (path, problem))

    try:
        with tarfile.open(path, "r|*") as tar:
            members = iter(tar)
            head = next(members, None)
            if head is None or head.name != "manifest.json" or not head.isreg() or \
                    head.size > 16 * 1024 * 1024:
                raise refuse("its first member must be manifest.json")
            manifest_bytes = tar.extractfile(head).read()
            manifest = strict_json_loads(manifest_bytes.decode("utf-8"))
            listed = {m["path"]: m for m in manifest["members"]}
            signature, results = None, None
            for member in members:
                if member.name == "manifest.sig" and signature is None and member.isreg():
                    signature = tar.extractfile(member).read(256).decode("ascii", "replace")
                    continue
                expected = listed.get(member.name)
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or \
                        expected is None or member.size != expected["size"]:
                    raise refuse("the member %r is not a plain file listed in its manifest "
                                 "with that size" % member.name)
                if member.name == "results/results.jsonl":
                    results = tar.extractfile(member).read()
                    if hashlib.sha256(results).hexdigest() != expected["sha256"]:
                        raise refuse("results/results.jsonl does not match its sha256")
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError, KeyError, TypeError,
            UnicodeDecodeError) as exc:
        raise refuse("it is damaged or not an fm-edge bundle (%s)" % exc)
    if key:
        wanted = "hmac-sha256:" + hmac.new(key.encode("utf-8"), manifest_bytes,
                                           hashlib.sha256).hexdigest()
        if signature is None or not hmac.compare_digest(signature.strip(), wanted):
            raise refuse("its signature is missing or does not match --key")
    if results is None:
        raise refuse("it holds no results: export it with `fm-edge export BUNDLE --results`")
    return manifest, results


# ============================================================================================
# Command line
# ============================================================================================

def _build_parser():
    parser = argparse.ArgumentParser(
        prog="studio.py", description="A small FlowMason-Studio-compatible cloud for fm-edge. "
        "Without a sub-command it serves.")
    parser.add_argument("--db", default="studio.db", help="SQLite file (default: studio.db)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8999, help="port (0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("STUDIO_API_KEY", ""),
                        help="bearer key devices must send (or STUDIO_API_KEY)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--fault-api", action="store_true",
                        help="enable POST /_studio/faults (tests only)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    sub = parser.add_subparsers(dest="command")
    db_opt = argparse.ArgumentParser(add_help=False)
    db_opt.add_argument("--db", default=argparse.SUPPRESS, help="SQLite file")
    push = sub.add_parser("push", parents=[db_opt], help="add or update a pipeline document")
    push.add_argument("file")
    push.add_argument("--id", help="pipeline id (default: the document's id, else its name)")
    delete = sub.add_parser("delete", parents=[db_opt], help="delete a pipeline")
    delete.add_argument("pipeline_id")
    model = sub.add_parser("add-model", parents=[db_opt], help="add or replace a model file")
    model.add_argument("name")
    model.add_argument("file")
    bundle = sub.add_parser("import-bundle", parents=[db_opt],
                            help="ingest the results of an fm-edge bundle (air-gapped devices)")
    bundle.add_argument("bundle")
    bundle.add_argument("--key", default=os.environ.get("STUDIO_BUNDLE_KEY", ""),
                        help="bundle_key the device signs with (or STUDIO_BUNDLE_KEY): "
                        "refuse bundles not signed with it")
    bundle.add_argument("--json", action="store_true", help="print JSON")
    for name, text in (("pipelines", "list pipelines"), ("results", "list ingested results"),
                       ("devices", "list devices")):
        listing = sub.add_parser(name, parents=[db_opt], help=text)
        listing.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _serve(args):
    if not args.api_key:
        print("studio: no API key: pass --api-key KEY or set STUDIO_API_KEY", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("studio: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    context = make_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = StudioServer(StudioStore(args.db), args.api_key, args.host, args.port, context,
                          args.fault_api, quiet=not args.verbose)
    print("fm-edge studio listening on %s (db %s)" % (server.url, server.store.path), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.store.close()
    return 0


def _print_rows(rows, as_json, columns):
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        print("(none)")
    for row in rows:
        print("  ".join("%s=%s" % (column, row.get(column)) for column in columns))


def _admin(args):
    store = StudioStore(args.db)
    try:
        if args.command == "push":
            with open(args.file, "rb") as handle:
                entry = store.push_pipeline(handle.read(), args.id)
            state = "pushed" if entry["changed"] else "unchanged"
            print("%s %s version %s (revision %d, sha256 %s)" % (
                state, entry["id"], entry["version"], entry["revision"], entry["sha256"]))
        elif args.command == "delete":
            store.delete_pipeline(args.pipeline_id)
            print("deleted %s" % args.pipeline_id)
        elif args.command == "add-model":
            model = store.add_model(args.name, args.file)
            print("added model %s (%d bytes, sha256 %s)" % (model["name"], model["size"],
                                                            model["sha256"]))
        elif args.command == "import-bundle":
            report = import_bundle(store, args.bundle, args.key or None)
            print(json.dumps(report, indent=2, sort_keys=True) if args.json else
                  "imported %d results from device %s: %d new, %d duplicate, %d rejected" % (
                      report["results"], report["device_id"], report["accepted"],
                      report["duplicate"], len(report["rejected"])))
        elif args.command == "pipelines":
            _print_rows(store.list_pipelines(), args.json,
                        ("id", "version", "revision", "deleted", "sha256"))
        elif args.command == "results":
            _print_rows(store.list_results(), args.json,
                        ("run_id", "pipeline_id", "status", "device_id", "received_at"))
        elif args.command == "devices":
            _print_rows(store.list_devices(), args.json,
                        ("device_id", "name", "version", "platform", "last_heartbeat"))
    finally:
        store.close()
    return 0


def main(argv=None):
    args = _build_parser().parse_args(argv)
    try:
        if args.command is None:
            return _serve(args)
        return _admin(args)
    except StudioError as err:
        print("studio: %s" % err.message, file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error, ssl.SSLError) as exc:
        print("studio: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
