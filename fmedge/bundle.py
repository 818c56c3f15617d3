"""Air-gapped transfer: ``export_bundle`` and ``import_bundle`` (``fm-edge export/import``).

A bundle (format in ``bundle_format.py``) carries pipelines, models and pending results
from one device to another device, or to the cloud, on a USB stick.

Export writes the archive to a temporary file beside ``path``, fsyncs it and renames it
into place (reliability.md §1.1): a pulled stick holds the old bundle or the new one, never
half of one. It marks nothing as synced: an exported result stays pending on this device
until the cloud acknowledges it (by sync, or after ``tools/studio.py import-bundle``, when
the next sync is answered "duplicate"). A result may reach the cloud both ways; the cloud
de-duplicates by run_id.

Import checks everything before it changes anything: the manifest, the signature (a device
with a ``bundle_key`` refuses unsigned bundles), each member's name, type, size and sha256,
free disk, ids, pipeline documents (full validation) and models (GGUF, cap, not in use).
Only then, holding the sync lock so no sync pass interleaves, it installs:

* models, each through the model cache (verified copy, atomic rename); a model already
  cached with the same sha256 is left alone;
* pipelines, with source ``bundle`` and the exporter's version; a pipeline already cached
  with the same sha256 and version is left alone. If storing one fails, the ones stored
  before it are undone; models installed before that stay (each is complete and verified);
* for pipelines the exporter got from the cloud, the ETag the cloud served them under, in
  the sync state (beside the sha256 it names). When anything changed, the sync cursor
  restarts at 0 so the next pass re-checks every pipeline: one the cloud holds with the
  same sha256 is adopted as unchanged (no new version, no conflict); one the cloud holds in
  another version is replaced by the cloud's (the bundle's is kept for rollback), unless
  the pipeline is pinned.

The results in a bundle are for the cloud: a device import checks them and reports their
count, but never adds them to its own result store (they are another device's runs;
uploading them from here would send them under the wrong device id).
"""

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile

from . import bundle_format as F
from .errors import BusyError, NotFoundError, StorageError, UsageError
from .fsutil import ensure_dir, free_bytes, fsync_dir, storage_error
from .ids import validate_id

log = logging.getLogger("fmedge.bundle")

SYNC_STATE_FILE = "sync_state.json"     # fmedge.sync.once.STATE_FILE_NAME
LOCK_WAIT_S = 5.0
SPOOL_BYTES = 8 * 1024 * 1024           # results kept in memory before spilling to disk
RESULTS_NOTE = ("results in a bundle are for the cloud: import them with `python3 "
                "tools/studio.py import-bundle BUNDLE`; they are not added to this device")


def bundle_key(config, key=None):
    """The HMAC key: ``key`` when given, else the configured ``bundle_key`` ('' = none)."""
    return key if key is not None else (getattr(config, "bundle_key", "") or "")


# == Export ==================================================================================

def export_bundle(runtime, path, pipelines=None, models=None, results=False, key=None):
    """Write a bundle to ``path``; returns a JSON-ready report.

    ``pipelines``: ids (default: every cached pipeline; ``[]`` for none). ``models``: names
    of cached models (default: none). ``results``: include pending results. The archive is
    gzip-compressed unless ``path`` ends in ``.tar``.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    _check_destination(path)
    key = bundle_key(runtime.config, key)
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    items = _pipeline_items(runtime, pipelines)
    chosen = _model_items(runtime.config, models or [])
    spool = _results_spool(runtime, os.path.dirname(path)) if results else None
    try:
        plan = _Export(path, created, items, chosen, spool)
        manifest = plan.manifest(runtime.device_id)
        written = plan.write(manifest, key)
    finally:
        if spool is not None:
            spool["file"].close()
    return _export_report(path, manifest, written, bool(key), spool)


def _check_destination(path):
    if os.path.isdir(path):
        raise UsageError("%s is a directory: give the bundle a file name, e.g. %s"
                         % (path, os.path.join(path, "fm-edge-bundle.tar.gz")))
    ensure_dir(os.path.dirname(path))


def _pipeline_items(runtime, wanted):
    """[(entry, canonical bytes, cloud etag or None)] sorted by id."""
    from .cache.pipelines import canonical_json

    cache = runtime.pipelines
    ids = [e["id"] for e in cache.list_now()] if wanted is None else sorted(set(wanted))
    etags = _known_etags(cache.cache_dir)
    items = []
    for pipeline_id in ids:
        entry = cache.entry(pipeline_id) if cache.exists_now(pipeline_id) else None
        document = cache.get_now(pipeline_id) if entry else None
        if document is None:
            raise NotFoundError("pipeline %s is not cached on this device, so it cannot be "
                                "exported: `fm-edge list` shows the cached ones" % pipeline_id)
        known = etags.get(pipeline_id) or {}
        etag = known.get("etag") if known.get("sha256") == entry["sha256"] else None
        items.append((entry, canonical_json(document).encode("utf-8"), etag))
    return items


def _known_etags(cache_dir):
    """The sync state's ETags, read only (a damaged state file is sync's to deal with)."""
    try:
        with open(os.path.join(cache_dir, SYNC_STATE_FILE), encoding="utf-8") as handle:
            etags = json.load(handle).get("etags", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return etags if isinstance(etags, dict) else {}


def _model_items(config, names):
    """[{name, path, size, sha256}] sorted by name; sha256 from the cache index if known."""
    if not names:
        return []
    from .cache.models import ModelCache

    cache = ModelCache(config=config)
    entries = {e["name"]: e for e in cache.list()}
    items = []
    for name in sorted(set(names)):
        entry = entries.get(validate_id(name, "model"))
        if entry is None:
            raise NotFoundError("model %s is not in the model cache %s: `fm-edge models list` "
                                "shows the cached ones" % (name, cache.cache_dir))
        sha = entry["sha256"] or _file_sha256(entry["path"])
        items.append({"name": name, "path": entry["path"], "size": entry["size"],
                      "sha256": sha, "cache": cache})
    return items


def _file_sha256(path):
    reader = F.HashingReader(_open_source(path))
    with reader.handle:
        while reader.read(F.CHUNK):
            pass
    return reader.digest.hexdigest()


def _open_source(path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise StorageError("cannot read %s for the bundle: %s" % (path, exc.strerror or exc))


def _results_spool(runtime, directory):
    """Pending results as JSON lines in a temporary file: {file, size, sha256, count, skipped}."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=directory)
    digest, count, skipped, size = hashlib.sha256(), 0, 0, 0
    for pending in runtime.results.iter_pending():
        # A copy: iter_pending pages on the _seq of the rows it handed out.
        row = {k: v for k, v in pending.items() if k != "_seq"}
        try:
            line = (json.dumps(row, sort_keys=True, separators=(",", ":"), allow_nan=False)
                    + "\n").encode("utf-8")
        except (TypeError, ValueError):
            skipped += 1     # the cloud refuses it too; sync quarantines it with the reason
            continue
        spool.write(line)
        digest.update(line)
        size += len(line)
        count += 1
    spool.seek(0)
    return {"file": spool, "size": size, "sha256": digest.hexdigest(), "count": count,
            "skipped": skipped}


class _Export:
    """The members of one bundle, and writing them to disk atomically."""

    def __init__(self, path, created, pipelines, models, results):
        self.path = path
        self.created = created
        self.pipelines = pipelines
        self.models = models
        self.results = results

    def manifest(self, device_id):
        from . import __version__

        members, pipelines, models = [], [], []
        for entry, data, etag in self.pipelines:
            path = F.pipeline_member(entry["id"])
            members.append({"path": path, "size": len(data), "sha256": entry["sha256"]})
            pipelines.append({"id": entry["id"], "version": entry["version"],
                              "sha256": entry["sha256"], "source": entry["source"],
                              "cloud_etag": etag, "path": path})
        for model in self.models:
            path = F.model_member(model["name"])
            members.append({"path": path, "size": model["size"], "sha256": model["sha256"]})
            models.append({"name": model["name"], "size": model["size"],
                           "sha256": model["sha256"], "path": path})
        results = None
        if self.results is not None:
            members.append({"path": F.RESULTS_PATH, "size": self.results["size"],
                            "sha256": self.results["sha256"]})
            results = {"count": self.results["count"], "path": F.RESULTS_PATH}
        return {"format": F.FORMAT, "format_version": F.FORMAT_VERSION,
                "fm_edge_version": __version__,
                "created_at": self.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "device_id": device_id, "members": members, "pipelines": pipelines,
                "models": models, "results": results}

    def write(self, manifest, key):
        """Temp file, fsync, rename, fsync the directory; returns {size, sha256}."""
        manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        signature = F.signature_for(manifest_bytes, key) if key else None
        directory = os.path.dirname(self.path)
        self._check_room(manifest, directory)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-bundle-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as raw:
                out = F.HashingWriter(raw)
                self._write_tar(out, manifest_bytes, signature)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, self.path)
            fsync_dir(directory)
        except OSError as exc:
            _remove_quietly(tmp)
            raise storage_error(exc, self.path) from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        return {"size": out.size, "sha256": out.digest.hexdigest()}

    def _check_room(self, manifest, directory):
        # Uncompressed sizes plus tar headers: a bound, since gzip only makes it smaller.
        needed = sum(m["size"] + 1024 for m in manifest["members"]) + 64 * 1024
        free = free_bytes(directory)
        if needed > free:
            raise StorageError("the bundle needs up to %d bytes but the disk holding %s has %d "
                               "free: export to a larger disk, or export fewer models"
                               % (needed, directory, free))

    def _write_tar(self, out, manifest_bytes, signature):
        import gzip
        import io
        import tarfile

        compressed = not self.path.endswith(".tar")
        # mtime=0 and no file name in the gzip header: no needless difference between runs.
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) if compressed \
            else out
        mtime = self.created.timestamp()
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(F.member_header(F.MANIFEST, len(manifest_bytes), mtime),
                        io.BytesIO(manifest_bytes))
            if signature is not None:
                tar.addfile(F.member_header(F.SIGNATURE, len(signature), mtime),
                            io.BytesIO(signature))
            for entry, data, _ in self.pipelines:
                tar.addfile(F.member_header(F.pipeline_member(entry["id"]), len(data), mtime),
                            io.BytesIO(data))
            for model in self.models:
                _add_model(tar, model, mtime)
            if self.results is not None:
                tar.addfile(F.member_header(F.RESULTS_PATH, self.results["size"], mtime),
                            self.results["file"])
        if compressed:
            stream.close()


def _add_model(tar, model, mtime):
    """Copy a model into the tar, holding it "in use" so it cannot be evicted meanwhile."""
    with model["cache"].use(model["name"]) as path:
        reader = F.HashingReader(_open_source(path))
        with reader.handle:
            tar.addfile(F.member_header(F.model_member(model["name"]), model["size"], mtime),
                        reader)
    if reader.digest.hexdigest() != model["sha256"]:
        raise StorageError("model %s does not match the sha256 recorded when it was added "
                           "(%s): the file is damaged; remove it (`fm-edge models rm %s`) and "
                           "add it again" % (model["name"], model["sha256"], model["name"]))


def _export_report(path, manifest, written, signed, spool):
    results = None
    if spool is not None:
        results = {"count": spool["count"], "skipped_not_json": spool["skipped"],
                   "marked_synced": 0}
    return {"bundle": path, "format_version": F.FORMAT_VERSION, "bytes": written["size"],
            "sha256": written["sha256"], "signed": signed,
            "compression": "none" if path.endswith(".tar") else "gzip",
            "created_at": manifest["created_at"], "device_id": manifest["device_id"],
            "pipelines": [{k: p[k] for k in ("id", "version", "sha256")}
                          for p in manifest["pipelines"]],
            "models": [{k: m[k] for k in ("name", "size", "sha256")}
                       for m in manifest["models"]],
            "results": results}


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# == Import ==================================================================================

def import_bundle(runtime, path, key=None):
    """Check a bundle completely, then install its pipelines and models; returns a report.

    Raises UsageError (codes ``invalid_bundle``, ``bad_signature``, ``bundle_unsigned``,
    ``invalid_pipeline``, ``invalid_id``, ``not_gguf``, ``model_too_large``), StorageError
    (not enough free disk) or BusyError (a model in use, or a sync holding the lock for
    longer than a few seconds); in each case nothing was changed.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise UsageError("%s is not a file: give the path of a bundle made by `fm-edge "
                         "export`" % path, code="not_a_file")
    plan = _Import(runtime, path)
    try:
        manifest, signature = F.read_bundle(path, bundle_key(runtime.config, key),
                                            plan.check_manifest, plan.sink_for)
        plan.check_contents()
        report = plan.install()
    finally:
        plan.discard_staging()
    return dict(report, bundle=path, signature=signature,
                format_version=manifest["format_version"],
                fm_edge_version=manifest.get("fm_edge_version"),
                created_at=manifest.get("created_at"), device_id=manifest["device_id"])


class _Import:
    """One import: checks (before and while reading), staging, then installing."""

    def __init__(self, runtime, bundle):
        self.runtime = runtime
        self.config = runtime.config
        self.bundle = bundle
        self.manifest = None
        self.documents = {}          # pipeline id -> parsed document
        self.raw = {}                # member path -> BytesIO (pipelines)
        self.staged = {}             # model name -> _StagingFile
        self.staging = None
        self.cached_models = {}      # name -> cache entry
        self.models = None           # the ModelCache, opened only when models come

    # -- before any member is read -----------------------------------------------------------

    def check_manifest(self, manifest):
        # The reader reports OSErrors as a damaged bundle: a local disk error must not be.
        try:
            self._check_manifest(manifest)
        except OSError as exc:
            raise storage_error(exc, self.config.data_dir) from exc

    def _check_manifest(self, manifest):
        self.manifest = manifest
        total = sum(self._member(p)["size"] for p in manifest["pipelines"])
        cache = self.runtime.pipelines
        if total > cache.max_bytes:
            raise F.invalid(self.bundle, "its pipelines take %d bytes, more than the pipeline "
                            "cache's cap of %d: raise pipeline_cache_size_mb"
                            % (total, cache.max_bytes), code="too_large")
        if manifest["models"]:
            self._check_models(manifest["models"])
        self._check_free_space()

    def _member(self, item):
        return self.manifest["members"][item["path"]]

    def _check_models(self, models):
        from .cache.models import ModelCache

        self.models = ModelCache(config=self.config)
        self.cached_models = {e["name"]: e for e in self.models.list()}
        for model in models:
            if model["size"] > self.models.max_bytes:
                raise UsageError("model %s in bundle %s is %d bytes, more than the model "
                                 "cache's cap of %d: raise model_cache_size_gb; nothing was "
                                 "imported" % (model["name"], self.bundle, model["size"],
                                               self.models.max_bytes), code="model_too_large")
            cached = self.cached_models.get(model["name"])
            if cached and cached["sha256"] != model["sha256"] and cached["in_use"]:
                raise BusyError("model %s is in use, so bundle %s cannot replace it: stop what "
                                "uses it and import again; nothing was imported"
                                % (model["name"], self.bundle))

    def _new_models(self):
        return [m for m in self.manifest["models"] if not self._model_unchanged(m)]

    def _model_unchanged(self, model):
        cached = self.cached_models.get(model["name"])
        return bool(cached) and cached["sha256"] == model["sha256"]

    def _check_free_space(self):
        """Room for staging, the model cache copy and the pipelines, plus the reserve."""
        model_bytes = sum(m["size"] for m in self._new_models())
        pipeline_bytes = sum(self._member(p)["size"] for p in self.manifest["pipelines"])
        needs = {}
        for directory, size in ((self.config.data_dir, model_bytes),
                                (self.config.model_cache_dir, model_bytes),
                                (self.config.pipeline_cache_dir, pipeline_bytes)):
            existing = _existing_ancestor(directory)
            device = os.stat(existing).st_dev
            needs[device] = (existing, needs.get(device, (existing, 0))[1] + size)
        reserve = int(self.config.min_free_disk_mb * 1024 * 1024)
        for existing, size in needs.values():
            free = free_bytes(existing)
            if size and size + reserve > free:
                raise StorageError(
                    "bundle %s needs %d bytes (plus %d kept free) on the disk holding %s, "
                    "which has %d free: free some space (`fm-edge clear-cache`), then import "
                    "again; nothing was imported" % (self.bundle, size, reserve, existing,
                                                     free))

    # -- while members stream ----------------------------------------------------------------

    def sink_for(self, member_path):
        import io

        if member_path.startswith("pipelines/"):
            self.raw[member_path] = io.BytesIO()
            return self.raw[member_path]
        for model in self.manifest["models"]:
            if model["path"] == member_path and not self._model_unchanged(model):
                return self._stage(model["name"])
        return F.NullSink()    # results, and models this device already has

    def _stage(self, name):
        if self.staging is None:
            ensure_dir(self.config.data_dir)
            try:
                self.staging = tempfile.mkdtemp(prefix=".bundle-import-",
                                                dir=self.config.data_dir)
            except OSError as exc:
                raise storage_error(exc, self.config.data_dir) from exc
        path = os.path.join(self.staging, F.model_member(name).split("/", 1)[1])
        self.staged[name] = _StagingFile(path)
        return self.staged[name]

    # -- after every byte was checked --------------------------------------------------------

    def check_contents(self):
        for staged in self.staged.values():
            staged.close()     # flushed before the model cache reads it
        self._parse_pipelines()
        self._validate_pipelines()
        self._check_gguf()

    def _parse_pipelines(self):
        from .cache.pipelines import document_sha256

        for item in self.manifest["pipelines"]:
            data = self.raw[item["path"]].getvalue()
            try:
                document = F.strict_json(data, item["path"])
            except ValueError as exc:
                raise F.invalid(self.bundle, str(exc), code="invalid_pipeline") from None
            if document_sha256(document) != item["sha256"]:
                raise F.invalid(self.bundle, "pipeline %s is not in canonical form, so its "
                                "sha256 cannot be trusted" % item["id"])
            self.documents[item["id"]] = document

    def _validate_pipelines(self):
        """The engine's full validation; parents named by ``extends`` may be in the bundle."""
        from .errors import PipelineValidationError
        from .ids import is_valid_id
        from .runtime import pipeline_validator

        cache = self.runtime.pipelines

        def lookup(pipeline_id):
            if pipeline_id in self.documents:
                return self.documents[pipeline_id]
            return cache.get_now(pipeline_id) if is_valid_id(pipeline_id) else None

        validate = pipeline_validator(lookup)
        for pipeline_id, document in sorted(self.documents.items()):
            try:
                validate(document, pipeline_id)
            except PipelineValidationError as exc:
                raise UsageError("bundle %s refused, nothing was imported: %s"
                                 % (self.bundle, exc), code="invalid_pipeline") from None

    def _check_gguf(self):
        from .cache.download import GGUF_MAGIC

        for name, staged in sorted(self.staged.items()):
            try:
                with open(staged.path, "rb") as handle:
                    head = handle.read(len(GGUF_MAGIC))
            except OSError as exc:
                raise storage_error(exc, staged.path) from exc
            if head != GGUF_MAGIC:
                raise UsageError("model %s in bundle %s is not a GGUF file (it starts with "
                                 "%r); nothing was imported" % (name, self.bundle, head),
                                 code="not_gguf")

    # -- installing --------------------------------------------------------------------------

    def install(self):
        from .sync.lock import SyncLock

        lock = SyncLock(self.config.data_dir)
        if not lock.acquire(LOCK_WAIT_S):
            raise lock.busy_error(LOCK_WAIT_S)
        try:
            models = [self._install_model(m) for m in self.manifest["models"]]
            pipelines = _PipelineInstall(self.runtime.pipelines, self.manifest["pipelines"],
                                         self.documents).run()
            sync_state = self._record_sync_state(pipelines)
        finally:
            lock.release()
        results = self.manifest.get("results")
        return {"pipelines": pipelines, "models": models, "sync_state": sync_state,
                "results": {"count": results["count"] if results else 0, "imported": 0,
                            "note": RESULTS_NOTE}}

    def _install_model(self, model):
        report = {"name": model["name"], "size": model["size"], "sha256": model["sha256"]}
        if self._model_unchanged(model):
            return dict(report, status="unchanged")
        status = "updated" if model["name"] in self.cached_models else "added"
        entry = self.models.add(self.staged[model["name"]].path, name=model["name"])
        return dict(report, status=status, evicted=entry.get("evicted", []))

    def _record_sync_state(self, pipelines):
        """ETags of the cloud's documents; a cursor restart when anything changed."""
        from .sync.once import SyncState

        etags = {p["id"]: {"etag": p["cloud_etag"], "sha256": p["sha256"]}
                 for p in self.manifest["pipelines"] if p.get("cloud_etag")}
        changed = any(p["status"] != "unchanged" for p in pipelines)
        if not etags and not changed:
            return {"etags_recorded": 0, "cursor_reset": False}
        state = SyncState.load(self.runtime.pipelines.cache_dir)
        state.etags.update(etags)
        if changed:
            state.cursor = 0
        try:
            state.save()
        except StorageError as exc:
            # The pipelines are in place and run; only the next sync's shortcut is lost.
            log.warning("bundle %s: pipelines imported, but the sync state could not be "
                        "written (%s): the next sync downloads them again", self.bundle, exc)
            return {"etags_recorded": 0, "cursor_reset": False, "error": str(exc)}
        return {"etags_recorded": len(etags), "cursor_reset": changed}

    def discard_staging(self):
        for staged in self.staged.values():
            staged.close()
        if self.staging is not None:
            try:
                shutil.rmtree(self.staging)
            except OSError as exc:
                log.warning("could not remove the bundle staging folder %s: %s; delete it "
                            "by hand", self.staging, exc)
            self.staging = None


class _StagingFile:
    """A model's bytes on their way to the model cache; write errors name the disk."""

    def __init__(self, path):
        self.path = path
        try:
            self.handle = open(path, "wb")
        except OSError as exc:
            raise storage_error(exc, path) from exc

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def close(self):
        if not self.handle.closed:
            try:
                self.handle.close()
            except OSError as exc:
                raise storage_error(exc, self.path) from exc


class _PipelineInstall:
    """Store the bundle's pipelines, parents before children; all or none.

    A pipeline already cached with the same sha256 and version is left as it is (its
    source too: a cloud copy stays a cloud copy). If a store fails, those stored before it
    are undone: removed when they were new, else put back as they were.
    """

    def __init__(self, cache, items, documents):
        self.cache = cache
        self.items = items
        self.documents = documents

    def run(self):
        done, reports = [], []
        try:
            for item in _parents_first(self.items, self.documents):
                before = self.cache.entry(item["id"])
                status = _install_status(before, item)
                if status != "unchanged":
                    self.cache.store_now(item["id"], self.documents[item["id"]],
                                         source="bundle", version=item["version"])
                    done.append(before or {"id": item["id"]})
                reports.append(_pipeline_report(item, before, status))
        except Exception:
            self._undo(done)
            raise
        return sorted(reports, key=lambda r: r["id"])

    def _undo(self, done):
        for before in reversed(done):
            pipeline_id = before["id"]
            try:
                if "sha256" not in before:
                    self.cache.remove_now(pipeline_id)
                elif self.cache.entry(pipeline_id)["sha256"] != before["sha256"]:
                    self.cache.rollback_now(pipeline_id)
                else:
                    self.cache.store_now(pipeline_id, self.cache.get_now(pipeline_id),
                                         source=before["source"], version=before["version"])
            except Exception as exc:   # keep undoing the rest; the first error is raised
                log.error("could not undo the import of pipeline %s: %s", pipeline_id, exc)


def _install_status(before, item):
    if before is None:
        return "added"
    if before["sha256"] == item["sha256"] and before["version"] == item["version"]:
        return "unchanged"
    return "updated"


def _pipeline_report(item, before, status):
    report = {"id": item["id"], "version": item["version"], "sha256": item["sha256"],
              "status": status}
    if status == "updated":
        report.update(previous_version=before["version"], previous_source=before["source"])
    return report


def _parents_first(items, documents):
    """Items ordered so a pipeline comes after the bundled parent it extends."""
    by_id = {item["id"]: item for item in items}
    ordered, placed = [], set()

    def place(pipeline_id):
        if pipeline_id in placed or pipeline_id not in by_id:
            return
        placed.add(pipeline_id)     # before the parent: a cycle cannot recurse forever
        parent = documents[pipeline_id].get("extends")
        if isinstance(parent, str):
            place(parent.partition("@")[0].strip())
        ordered.append(by_id[pipeline_id])

    for pipeline_id in sorted(by_id):
        place(pipeline_id)
    return ordered


def _existing_ancestor(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
