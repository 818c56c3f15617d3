"""PipelineCache: pipeline documents kept on the device for offline runs.

One SQLite file in ``cache_dir``. Each entry keeps id, version, sha256, source
(``cloud``, ``local`` or ``bundle``), size and added/last-used times; the version it
replaced is kept for rollback. ``cleanup`` applies the TTL (counted from last use, so a
pipeline that runs never expires) and then the size cap (least recently used first);
pipelines added locally are never removed by ``cleanup``, only by ``remove``/``clear``.
"""

import hashlib
import json
import logging
import os
import time

from .. import defaults as D
from ..aio import run_blocking
from ..db import Database
from ..errors import PipelineValidationError, UsageError
from ..ids import validate_id

log = logging.getLogger("fmedge.pipelines")

SOURCES = ("local", "cloud", "bundle")
# A last-used time is rewritten at most this often per pipeline: a fsync per run for a
# time that only feeds eviction would cost more than the run itself.
_TOUCH_EVERY_S = 60.0
# A document read from the file is served from memory, for this process's own changes
# are seen at once (Database.generation) and other processes' (`fm-edge add`, a sync
# from cron) within this many seconds. A read gives up the GIL; under load each costs a
# wait behind every other thread, more than a run.
_RECHECK_S = 1.0
_TEXTS_KEPT = 256

_MIGRATIONS = [
    """
    CREATE TABLE pipelines (
        id TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        size INTEGER NOT NULL,
        document TEXT NOT NULL,
        added_at REAL NOT NULL,
        last_used_at REAL NOT NULL
    );
    CREATE TABLE previous_versions (
        id TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        size INTEGER NOT NULL,
        document TEXT NOT NULL,
        replaced_at REAL NOT NULL
    )
    """,
]
_ENTRY_COLUMNS = ("id", "version", "sha256", "source", "size", "added_at", "last_used_at")


def document_sha256(document):
    """sha256 of the canonical JSON form (sorted keys, no spaces, UTF-8)."""
    return hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def canonical_json(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_document_shape(document, pipeline_id):
    """The minimum every stored pipeline must satisfy: an object with a list of stages."""
    if not isinstance(document, dict):
        raise PipelineValidationError(
            f"pipeline {pipeline_id}: the document must be a JSON object, "
            f"got {type(document).__name__}")
    stages = document.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PipelineValidationError(
            f"pipeline {pipeline_id}: field 'stages' must be a non-empty list of stages")


class PipelineCache:
    """The seed's async API (store/get/exists/cleanup) plus list, remove and rollback."""

    def __init__(self, cache_dir, max_size_mb=D.DEFAULT_PIPELINE_CACHE_SIZE_MB,
                 ttl_days=D.DEFAULT_PIPELINE_TTL_DAYS, validator=None, clock=time.time):
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.max_bytes = int(max_size_mb * 1024 * 1024)
        self.ttl_days = ttl_days
        # The pipeline engine supplies a full validator; alone, the cache checks the shape.
        self.validator = validator or check_document_shape
        self.clock = clock
        self._touched = {}
        self._texts = {}      # id -> (document JSON, db generation, monotonic recheck time)
        self.db = Database(os.path.join(self.cache_dir, D.PIPELINE_DB_NAME), _MIGRATIONS)

    # -- the seed's async API ---------------------------------------------------------

    async def store(self, pipeline_id, pipeline_config, source="local", version=None):
        return await run_blocking(self.store_now, pipeline_id, pipeline_config, source,
                                  version)

    async def get(self, pipeline_id):
        return await run_blocking(self.get_now, pipeline_id)

    async def exists(self, pipeline_id):
        return await run_blocking(self.exists_now, pipeline_id)

    async def cleanup(self):
        return await run_blocking(self.cleanup_now)

    async def list(self):
        return await run_blocking(self.list_now)

    async def remove(self, pipeline_id):
        return await run_blocking(self.remove_now, pipeline_id)

    async def rollback(self, pipeline_id):
        return await run_blocking(self.rollback_now, pipeline_id)

    # -- blocking implementation ------------------------------------------------------

    def store_now(self, pipeline_id, document, source="local", version=None):
        """Validate and store ``document``; the replaced version is kept for rollback."""
        validate_id(pipeline_id, "pipeline")
        if source not in SOURCES:
            raise UsageError(f"unknown pipeline source {source!r}: use one of "
                             + ", ".join(SOURCES))
        if isinstance(document, (str, bytes)):
            document = _parse_json(document, pipeline_id)
        self.validator(document, pipeline_id)
        text = canonical_json(document)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        version = str(version or document.get("version") or "1")
        now = self.clock()
        with self.db.transaction() as conn:
            current = conn.execute("SELECT sha256 FROM pipelines WHERE id=?",
                                   (pipeline_id,)).fetchone()
            if current and current[0] == digest:
                conn.execute("UPDATE pipelines SET source=?, version=?, last_used_at=? "
                             "WHERE id=?", (source, version, now, pipeline_id))
            else:
                if current:
                    _keep_previous(conn, pipeline_id, now)
                conn.execute(
                    "INSERT OR REPLACE INTO pipelines (id, version, sha256, source, size, "
                    "document, added_at, last_used_at) VALUES (?,?,?,?,?,?,?,?)",
                    (pipeline_id, version, digest, source, len(text.encode("utf-8")), text,
                     now, now))
        self._evict_over_size(keep=pipeline_id)
        return self.entry(pipeline_id)

    def get_now(self, pipeline_id):
        """The stored document (a fresh copy), or None; counts as a use for LRU and TTL.
        Changes made by other processes show within _RECHECK_S seconds."""
        validate_id(pipeline_id, "pipeline")
        text = self._document_text(pipeline_id)
        if text is None:
            return None
        self._touch(pipeline_id)
        return json.loads(text)

    def _document_text(self, pipeline_id):
        generation, now = self.db.generation, time.monotonic()   # before the read
        cached = self._texts.get(pipeline_id)
        if cached is not None and cached[1] == generation and now < cached[2]:
            return cached[0]
        row = self.db.query_one("SELECT document FROM pipelines WHERE id=?", (pipeline_id,))
        if row is None:       # not remembered: one added elsewhere must show at once
            self._texts.pop(pipeline_id, None)
            return None
        if len(self._texts) >= _TEXTS_KEPT:
            self._texts.clear()
        self._texts[pipeline_id] = (row[0], generation, now + _RECHECK_S)
        return row[0]

    def exists_now(self, pipeline_id):
        validate_id(pipeline_id, "pipeline")
        return self.db.query_one("SELECT 1 FROM pipelines WHERE id=?",
                                 (pipeline_id,)) is not None

    def entry(self, pipeline_id):
        """Metadata of one pipeline (no document), with ``previous_version``; or None."""
        row = self.db.query_one(
            f"SELECT {', '.join('p.' + c for c in _ENTRY_COLUMNS)}, v.version "
            "FROM pipelines p LEFT JOIN previous_versions v ON v.id = p.id WHERE p.id=?",
            (pipeline_id,))
        return _entry(row) if row else None

    def list_now(self):
        rows = self.db.execute(
            f"SELECT {', '.join('p.' + c for c in _ENTRY_COLUMNS)}, v.version "
            "FROM pipelines p LEFT JOIN previous_versions v ON v.id = p.id ORDER BY p.id")
        return [_entry(row) for row in rows]

    def versions(self):
        """{id: version} of every cached pipeline (for heartbeats and sync)."""
        return dict(self.db.execute("SELECT id, version FROM pipelines"))

    def remove_now(self, pipeline_id):
        """Remove a pipeline and its previous version; False if it was not cached."""
        validate_id(pipeline_id, "pipeline")
        with self.db.transaction() as conn:
            removed = conn.execute("DELETE FROM pipelines WHERE id=?",
                                   (pipeline_id,)).rowcount
            conn.execute("DELETE FROM previous_versions WHERE id=?", (pipeline_id,))
        return bool(removed)

    def rollback_now(self, pipeline_id):
        """Swap the current version with the previous one; returns the new entry."""
        validate_id(pipeline_id, "pipeline")
        now = self.clock()
        with self.db.transaction() as conn:
            previous = conn.execute(
                "SELECT version, sha256, source, size, document FROM previous_versions "
                "WHERE id=?", (pipeline_id,)).fetchone()
            if previous is None:
                raise UsageError(f"pipeline {pipeline_id} has no previous version to roll "
                                 "back to")
            _keep_previous(conn, pipeline_id, now)
            conn.execute(
                "UPDATE pipelines SET version=?, sha256=?, source=?, size=?, document=?, "
                "added_at=?, last_used_at=? WHERE id=?", previous + (now, now, pipeline_id))
        return self.entry(pipeline_id)

    def clear(self):
        """Remove every pipeline, local ones included; returns how many."""
        with self.db.transaction() as conn:
            removed = conn.execute("DELETE FROM pipelines").rowcount
            conn.execute("DELETE FROM previous_versions")
        return removed

    def cleanup_now(self):
        """Apply the TTL and the size cap to cloud/bundle pipelines; returns removed ids."""
        removed = self._expire_unused()
        return removed + self._evict_over_size()

    def total_bytes(self):
        row = self.db.query_one("SELECT COALESCE(SUM(size), 0) FROM pipelines")
        return row[0]

    def close(self):
        self.db.close()

    # -- eviction ---------------------------------------------------------------------

    def _expire_unused(self):
        if not self.ttl_days:
            return []
        cutoff = self.clock() - self.ttl_days * 86400.0
        rows = self.db.execute("SELECT id FROM pipelines WHERE source != 'local' AND "
                               "last_used_at < ? ORDER BY last_used_at", (cutoff,))
        return self._remove_all([r[0] for r in rows], "unused for over %g days" %
                                self.ttl_days)

    def _evict_over_size(self, keep=None):
        excess = self.total_bytes() - self.max_bytes
        if excess <= 0:
            return []
        victims = []
        for pipeline_id, size in self.db.execute(
                "SELECT id, size FROM pipelines WHERE source != 'local' "
                "ORDER BY last_used_at, id"):
            if excess <= 0:
                break
            if pipeline_id == keep:  # never evict what the caller just stored
                continue
            victims.append(pipeline_id)
            excess -= size
        return self._remove_all(victims, "least recently used, cache over %d MB" %
                                (self.max_bytes // 1048576))

    def _remove_all(self, ids, reason):
        for pipeline_id in ids:
            self.remove_now(pipeline_id)
            log.info("pipeline cache: removed %s (%s)", pipeline_id, reason)
        return ids

    def _touch(self, pipeline_id):
        now = self.clock()
        if now - self._touched.get(pipeline_id, float("-inf")) < _TOUCH_EVERY_S:
            return
        self._touched[pipeline_id] = now
        # No fsync of its own: a use lost to a power cut only ages the pipeline for LRU/TTL
        # a little sooner, and a run can look its pipeline up without waiting for the disk.
        with self.db.transaction(durable=False) as conn:
            conn.execute("UPDATE pipelines SET last_used_at=? WHERE id=?", (now, pipeline_id))


def _keep_previous(conn, pipeline_id, now):
    conn.execute(
        "INSERT OR REPLACE INTO previous_versions (id, version, sha256, source, size, "
        "document, replaced_at) SELECT id, version, sha256, source, size, document, ? "
        "FROM pipelines WHERE id=?", (now, pipeline_id))


def _entry(row):
    entry = dict(zip(_ENTRY_COLUMNS, row[:len(_ENTRY_COLUMNS)]))
    entry["previous_version"] = row[len(_ENTRY_COLUMNS)]
    return entry


def _parse_json(text, pipeline_id):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PipelineValidationError(f"pipeline {pipeline_id}: not valid JSON: {exc}") from exc
