"""ModelCache: GGUF model files on the device, by name (design.md §7).

Layout of ``cache_dir``::

    <name>.gguf            an active model (what llama.cpp loads; factory.model_path finds it)
    <name>.partial         a download or import in progress, kept across restarts
    <name>.partial.json    where that partial comes from (see download.py)
    index.json             {name: {size, sha256, added_at, last_used, source}}, atomic writes
    .locks/<name>.lock     the model's in-use lock
    .locks/<name>.fetch    held while the model is downloaded or imported
    .locks/index.lock      held while index.json is read, changed and written

**In use.** ``with cache.use(name) as path:`` holds a shared ``flock`` on
``.locks/<name>.lock`` for as long as the block runs. Any process can hold one (the
llama.cpp adapter should hold it while the model is loaded). Eviction and ``remove`` take
the exclusive lock without waiting, so eviction skips a model in use and ``remove``
refuses it. The kernel drops a flock when its process dies, so a crash never pins a
model. Lock files are empty and stay in place: deleting one could let two processes lock
different inodes under the same name.

**Truth.** The files are the truth and the index is metadata. A ``.gguf`` with no index
entry (a crash between the rename and the index write, or a file copied in by hand) is
listed with an unknown sha256. An index entry whose file is gone is forgotten.

**Size cap.** After a model is added, least recently used models are evicted until the
active models fit in ``max_size_gb``. Models in use and the model just added are never
evicted. Partials do not count towards the cap.
"""

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time

from .. import defaults as D
from ..aio import run_blocking
from ..errors import BusyError, InvalidIdError, NotFoundError, StorageError, UsageError
from ..fsutil import atomic_write, ensure_dir, free_bytes, fsync_dir, storage_error
from ..ids import is_valid_id, validate_id
from ..progress import human_bytes, terminal_progress
from .download import (DEFAULT_RETRIES, DEFAULT_STALL_TIMEOUT_S, PARTIAL_SUFFIX, CloudSource,
                       Partial, RetryPolicy, UrlSource, copy_hashing, gguf_problem, retrying,
                       transfer, verify)

log = logging.getLogger("fmedge.models")

MODEL_SUFFIX = ".gguf"
INDEX_FILE = "index.json"
LOCK_DIR = ".locks"
GB = 1024 ** 3
MB = 1024 ** 2
# last_used is rewritten at most this often per model: it only feeds eviction, and each
# write is an fsync.
TOUCH_EVERY_S = 60.0
# Ollama names: "llama3.2", "qwen2.5:0.5b", "user/model:tag". They never become paths.
_OLLAMA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}\Z")


class ModelCache:
    """GGUF files by name: ``ensure_model`` (async), ``get_model_path``, ``use``, ``list``,
    ``add``, ``pull``, ``remove``, ``clear``, ``evict``.

    ``cloud`` is a CloudClient (its read timeout is the stall timeout); without one, a
    client is made from ``config`` when it has a cloud_url. ``sleep`` and ``rng`` drive the
    retry backoff (tests pass instant ones). Every method but ``ensure_model`` blocks.
    """

    def __init__(self, cache_dir=None, max_size_gb=None, *, cloud=None, config=None,
                 clock=time.time, sleep=time.sleep, rng=None,
                 stall_timeout=DEFAULT_STALL_TIMEOUT_S, retries=DEFAULT_RETRIES,
                 min_free_bytes=None):
        if config is None:
            # The device's settings say where to download from (cloud_url) and which
            # backend pulls (ollama); an explicit cache_dir/max_size_gb still wins.
            from ..config import EdgeConfig
            config = EdgeConfig.load()
        self.config = config
        self.cache_dir = os.path.abspath(cache_dir or config.model_cache_dir)
        size_gb = max_size_gb if max_size_gb is not None else (
            config.model_cache_size_gb if config else D.DEFAULT_MODEL_CACHE_SIZE_GB)
        self.max_bytes = int(size_gb * GB)
        free_mb = config.min_free_disk_mb if config else D.DEFAULT_MIN_FREE_DISK_MB
        self.min_free_bytes = int(free_mb * MB) if min_free_bytes is None else min_free_bytes
        self.stall_timeout = stall_timeout
        self._cloud = cloud
        self._owns_cloud = False
        self._clock = clock
        self._policy = RetryPolicy(retries=retries, sleep=sleep, rng=rng)
        self._index = _Index(self.cache_dir)
        self._touched = {}

    def __repr__(self):
        return "ModelCache(%r, max_size_gb=%g)" % (self.cache_dir, self.max_bytes / GB)

    def close(self):
        if self._owns_cloud and self._cloud is not None:
            self._cloud.close()
            self._cloud = None

    # -- the seed's API ----------------------------------------------------------------------

    async def ensure_model(self, name, url=None, *, sha256=None, progress=None):
        """The model's path, downloading it first when it is not cached.

        From ``url`` when given (``sha256`` checks it), else from the cloud's model
        endpoints. With ``llm_backend = "ollama"`` (and no ``url``) Ollama is asked to pull
        the model instead, and its name is returned: Ollama keeps its own files.
        ``progress(done_bytes, total_bytes)`` is called from a worker thread.
        """
        # An explicit cloud client means "download from it"; otherwise the Ollama backend
        # keeps its own models and is asked to pull.
        if url is None and self._cloud is None and self._backend() == "ollama":
            name, _ = await self._ensure_ollama(name, progress)
            return name
        path = self.get_model_path(name)
        if path is not None:
            return path
        cancel = threading.Event()
        try:
            report = await run_blocking(lambda: self.pull(name, url, sha256=sha256,
                                                          progress=progress, cancel=cancel))
        except asyncio.CancelledError:
            cancel.set()    # the worker stops at its next chunk; the partial is kept
            raise
        return report["path"]

    def get_model_path(self, name):
        """Path of the cached model file, or None when it is not cached."""
        path = self._model_file(validate_id(name, "model"))
        if not os.path.isfile(path):
            return None
        self._touch(name)
        return path

    # -- using a model -----------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name):
        """Mark the model in use (across processes) for the ``with`` block; yields its path."""
        path = self._model_file(validate_id(name, "model"))
        fd = _open_lock(self._lock_path(name, "lock"))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)   # waits only while a remove holds it (an unlink)
            if not os.path.isfile(path):
                raise NotFoundError(_not_cached(name, self.cache_dir))
            self._touch(name)
            yield path
        finally:
            os.close(fd)

    def in_use(self, name):
        with self._exclusive(name) as free:
            return not free

    # -- listing -----------------------------------------------------------------------------

    def list(self):
        """Every cached model, least recently used first: name, path, size, sha256,
        added_at, last_used, source, in_use."""
        entries = self._entries()
        for entry in entries:
            entry["in_use"] = self.in_use(entry["name"])
        return entries

    def stats(self):
        entries = self._entries()
        return {"cache_dir": self.cache_dir, "count": len(entries),
                "used_bytes": sum(e["size"] for e in entries), "max_bytes": self.max_bytes}

    # -- adding models -----------------------------------------------------------------------

    def add(self, path, name=None, progress=None):
        """Import a GGUF file (e.g. from a USB stick); returns its entry plus ``evicted``."""
        src = os.path.abspath(os.path.expanduser(str(path)))
        name = validate_id(name or _name_from_file(src), "model")
        if not os.path.isfile(src):
            raise UsageError("%s is not a file: give the path of a .gguf model" % src,
                             code="not_a_file")
        problem = gguf_problem(src, src)
        if problem is not None:
            raise problem
        self._prepare_dir()
        with self._fetching(name):
            partial = Partial(self.cache_dir, name)
            size = os.path.getsize(src)
            self._check_room(name, size, 0)
            done = copy_hashing(src, partial, progress)
            verify(partial, done, src, expected_size=size)
            entry = self._activate(name, partial, done, "file:" + src)
        return dict(entry, evicted=self.evict(keep=(name,)))

    def pull(self, name, url=None, *, sha256=None, progress=None, cancel=None):
        """Download the model unless cached (blocking); returns a report of what was done."""
        validate_id(name, "model")
        self._prepare_dir()
        with self._fetching(name):
            path = self._model_file(name)
            if os.path.isfile(path):
                return dict(self._entry(name), already_cached=True, fetched_bytes=0,
                            resumed_from=0, attempts=0, evicted=[])
            source, size, sha = self._source(name, url, sha256)
            partial = Partial(self.cache_dir, name)
            partial.prepare(source.origin())
            self._check_room(name, size, partial.size())
            done = transfer(source, partial, progress=progress, policy=self._policy,
                            cancel=cancel)
            sha = sha or getattr(source, "etag_sha256", None)
            verify(partial, done, source.describe(), expected_size=size, expected_sha256=sha)
            if not sha:
                log.warning("model %s from %s was not checked against a sha256 (none was "
                            "given or served)", name, source.describe())
            entry = self._activate(name, partial, done, source.describe(), verified=bool(sha))
        return dict(entry, already_cached=False, fetched_bytes=done.fetched,
                    resumed_from=done.resumed_from, attempts=done.attempts,
                    evicted=self.evict(keep=(name,)))

    # -- removing models ---------------------------------------------------------------------

    def remove(self, name):
        """Delete the model (and any partial of it); False when there was nothing to delete.

        Raises BusyError while the model is in use.
        """
        validate_id(name, "model")
        if not os.path.isdir(self.cache_dir):
            return False
        with self._exclusive(name) as free:
            if not free:
                raise BusyError("model %s is in use (loaded by a runtime, or inside "
                                "`cache.use`): stop what uses it, then remove it" % name)
            removed = self._delete_model(name)
        with self._fetching(name, wait=False) as idle:
            if idle and os.path.exists(Partial(self.cache_dir, name).path):
                Partial(self.cache_dir, name).discard()
                removed = True
        return removed

    def clear(self):
        """Delete every model not in use and every partial not being written."""
        removed, kept, freed = [], [], 0
        for entry in self._entries():
            with self._exclusive(entry["name"]) as free:
                if not free:
                    kept.append(entry["name"])
                    continue
                self._delete_model(entry["name"])
            removed.append(entry["name"])
            freed += entry["size"]
        return {"removed": removed, "kept_in_use": kept, "freed_bytes": freed,
                "partials_removed": self._clear_partials()}

    def evict(self, keep=()):
        """Remove least recently used models until the cache fits ``max_size_gb``."""
        entries = self._entries()
        used = sum(e["size"] for e in entries)
        evicted = []
        for entry in entries:               # least recently used first
            if used <= self.max_bytes:
                break
            if entry["name"] in keep:
                continue
            with self._exclusive(entry["name"]) as free:
                if free:
                    self._delete_model(entry["name"])
                    evicted.append(entry["name"])
                    used -= entry["size"]
        if used > self.max_bytes:
            log.warning("model cache %s holds %s, over its cap of %s: the rest is in use or "
                        "was just added", self.cache_dir, human_bytes(used),
                        human_bytes(self.max_bytes))
        if evicted:
            log.info("evicted models %s to stay under %s", evicted, human_bytes(self.max_bytes))
        return evicted

    # -- internals: files and locks ----------------------------------------------------------

    def _model_file(self, name):
        return os.path.join(self.cache_dir, name + MODEL_SUFFIX)

    def _lock_path(self, name, kind):
        return os.path.join(self.cache_dir, LOCK_DIR, "%s.%s" % (name, kind))

    def _prepare_dir(self):
        ensure_dir(self.cache_dir)
        ensure_dir(os.path.join(self.cache_dir, LOCK_DIR))

    @contextlib.contextmanager
    def _exclusive(self, name):
        """Yields True holding the model's exclusive lock, False when someone uses it."""
        if not os.path.isdir(os.path.join(self.cache_dir, LOCK_DIR)):
            yield True      # no lock was ever taken here, so nothing can be in use
            return
        with _try_flock(self._lock_path(name, "lock"), fcntl.LOCK_EX) as got:
            yield got

    @contextlib.contextmanager
    def _fetching(self, name, wait=True):
        """One download or import of ``name`` at a time, across processes."""
        if wait:
            fd = _open_lock(self._lock_path(name, "fetch"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield True
            finally:
                os.close(fd)
            return
        with _try_flock(self._lock_path(name, "fetch"), fcntl.LOCK_EX) as got:
            yield got

    def _delete_model(self, name):
        """Unlink the model file and forget it. The caller holds its exclusive lock."""
        path = self._model_file(name)
        try:
            os.unlink(path)
            existed = True
        except FileNotFoundError:
            existed = False
        except OSError as exc:
            raise storage_error(exc, path) from exc
        if existed:
            fsync_dir(self.cache_dir)
        with self._index.editing() as index:
            index.pop(name, None)
        return existed

    def _clear_partials(self):
        count = 0
        if not os.path.isdir(self.cache_dir):
            return 0
        for entry in os.scandir(self.cache_dir):
            suffix = entry.name.endswith(PARTIAL_SUFFIX)
            name = entry.name[:-len(PARTIAL_SUFFIX)] if suffix else None
            if not name or not is_valid_id(name):
                continue
            with self._fetching(name, wait=False) as idle:
                if idle:
                    Partial(self.cache_dir, name).discard()
                    count += 1
        return count

    def _activate(self, name, partial, done, source, verified=True):
        """Rename the verified, fsynced partial into place and record it."""
        final = self._model_file(name)
        with self._exclusive(name) as free:
            if not free:
                raise BusyError("model %s is in use, so it cannot be replaced now: stop what "
                                "uses it and try again (the new file is kept in %s)"
                                % (name, partial.path))
            try:
                os.replace(partial.path, final)
                fsync_dir(self.cache_dir)    # the rename must survive a power cut too
            except OSError as exc:
                raise storage_error(exc, final) from exc
        partial.discard()                    # only the origin file is left
        now = self._clock()
        with self._index.editing() as index:
            index[name] = {"size": done.total, "sha256": done.sha256, "added_at": now,
                           "last_used": now, "source": source, "verified": verified}
        self._touched[name] = now
        return self._entry(name)

    def _entry(self, name):
        for entry in self._entries():
            if entry["name"] == name:
                return entry
        raise NotFoundError(_not_cached(name, self.cache_dir))

    def _entries(self):
        """Active models (files), least recently used first, without in_use."""
        index = self._index.read()
        entries = []
        for name, stat in _model_files(self.cache_dir):
            meta = index.get(name) or {}
            added = meta.get("added_at", stat.st_mtime)
            entries.append({"name": name, "path": self._model_file(name),
                            "size": stat.st_size, "sha256": meta.get("sha256"),
                            "added_at": added, "last_used": meta.get("last_used", added),
                            "source": meta.get("source", "unknown"),
                            "verified": bool(meta.get("verified", False))})
        entries.sort(key=lambda e: (e["last_used"], e["name"]))
        return entries

    def _touch(self, name):
        now = self._clock()
        if now - self._touched.get(name, float("-inf")) < TOUCH_EVERY_S:
            return
        self._touched[name] = now
        try:
            with self._index.editing() as index:
                if name in index:
                    index[name]["last_used"] = now
        except Exception as exc:     # a read-only disk must not stop a model from loading
            log.warning("could not record the use of model %s: %s", name, exc)

    # -- internals: sources and room ---------------------------------------------------------

    def _backend(self):
        return self.config.llm_backend if self.config is not None else None

    def _source(self, name, url, sha256):
        """(source, expected size or None, expected sha256 or None)."""
        if url is not None:
            ca_bundle = self.config.ca_bundle if self.config is not None else None
            return (UrlSource(url, sha256=sha256, ca_bundle=ca_bundle,
                              stall_timeout=self.stall_timeout), None, sha256)
        client = self._cloud_client()
        if client is None:
            raise NotFoundError(_not_cached(name, self.cache_dir) + ", and no cloud is "
                                "configured to download it from (set cloud_url, or pass a URL: "
                                "`fm-edge models pull %s --url URL`)" % name)
        try:
            manifest = retrying(lambda: client.model_manifest(name),
                                "the manifest of model %s" % name, self._policy)
        except NotFoundError as exc:
            raise NotFoundError("the cloud at %s has no model %r (%s): check the name, or "
                                "add the model to the cloud first" % (client.base_url, name,
                                                                       exc)) from exc
        return CloudSource(client, name, manifest["sha256"]), manifest["size"], \
            manifest["sha256"]

    def _cloud_client(self):
        if self._cloud is None and self.config is not None and self.config.cloud_url:
            from ..device import ensure_device_id
            from ..sync.client import CloudClient
            cfg = self.config
            self._cloud = CloudClient(cfg.cloud_url, cfg.api_key, ensure_device_id(cfg),
                                      ca_bundle=cfg.ca_bundle or None,
                                      read_timeout=self.stall_timeout)
            self._owns_cloud = True
        return self._cloud

    def _check_room(self, name, size, have):
        """Refuse before downloading what cannot fit: the cap, then the free disk space."""
        if size is None:
            return      # unknown until the server answers; a full disk then fails cleanly
        if size > self.max_bytes:
            raise UsageError(
                "model %s is %s, more than the model cache's cap of %s: raise the cap with "
                "`fm-edge config set model_cache_size_gb N`" % (
                    name, human_bytes(size), human_bytes(self.max_bytes)),
                code="model_too_large")
        needed = max(0, size - have) + self.min_free_bytes
        free = free_bytes(self.cache_dir)
        if needed > free:
            raise StorageError(
                "not enough free space for model %s: it needs %s more (plus %s kept free), "
                "but the disk holding %s has %s free. Free some space (`fm-edge models rm "
                "NAME`, `fm-edge clear-cache --models`) or point model_cache_dir at a larger "
                "disk" % (name, human_bytes(max(0, size - have)),
                          human_bytes(self.min_free_bytes), self.cache_dir, human_bytes(free)))

    # -- Ollama ------------------------------------------------------------------------------

    async def _ensure_ollama(self, name, progress):
        """(name, pulled): ask Ollama to pull ``name`` unless it already has it."""
        from ..adapters.ollama import OllamaAdapter
        check_ollama_name(name)
        adapter = OllamaAdapter(base_url=self.config.effective_llm_base_url(), model=name)
        try:
            present = {ollama_full_name(m) for m in await adapter.list_models()}
            if ollama_full_name(name) in present:
                return name, False
            await adapter.pull(name, progress=_pull_progress(progress))
        finally:
            await adapter.close()
        return name, True


# -- the index ---------------------------------------------------------------------------------

class _Index:
    """index.json: metadata by model name, changed under a cross-process lock."""

    def __init__(self, cache_dir):
        self.path = os.path.join(cache_dir, INDEX_FILE)
        self.lock_path = os.path.join(cache_dir, LOCK_DIR, "index.lock")
        self._thread_lock = threading.Lock()

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Only metadata: the files stay usable, sha256/last_used are rebuilt as needed.
            log.warning("model index %s is unreadable (%s); listing the files without it",
                        self.path, exc)
            return {}
        models = data.get("models") if isinstance(data, dict) else None
        return {k: v for k, v in (models or {}).items() if isinstance(v, dict)}

    @contextlib.contextmanager
    def editing(self):
        with self._thread_lock:
            fd = _open_lock(self.lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                index = self.read()
                before = json.dumps(index, sort_keys=True)
                yield index
                if json.dumps(index, sort_keys=True) != before:    # unchanged: no fsync
                    text = json.dumps({"models": index}, sort_keys=True, indent=1)
                    atomic_write(self.path, text.encode("utf-8"), mode=0o644)
            finally:
                os.close(fd)


def _open_lock(path):
    ensure_dir(os.path.dirname(path))
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(exc, path) from exc


@contextlib.contextmanager
def _try_flock(path, mode):
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _model_files(cache_dir):
    """(name, stat) of every ``<name>.gguf`` whose name is a valid model id."""
    try:
        entries = list(os.scandir(cache_dir))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.name[:-len(MODEL_SUFFIX)]
        if entry.name.endswith(MODEL_SUFFIX) and is_valid_id(name) and \
                entry.is_file(follow_symlinks=True):
            found.append((name, entry.stat()))
    return found


def _name_from_file(path):
    base = os.path.basename(path)
    return base[:-len(MODEL_SUFFIX)] if base.lower().endswith(MODEL_SUFFIX) else base


def _not_cached(name, cache_dir):
    return "model %s is not in the model cache %s" % (name, cache_dir)


# -- Ollama names ------------------------------------------------------------------------------

def check_ollama_name(name):
    """An Ollama model name ("llama3.2", "qwen2.5:0.5b", "user/model:tag") or InvalidIdError."""
    if not isinstance(name, str) or not _OLLAMA_NAME_RE.match(name) or ".." in name:
        raise InvalidIdError("invalid Ollama model name %r: use a name like llama3.2 or "
                             "qwen2.5:0.5b (letters, digits, '.', '_', '-', ':' and '/')"
                             % (name,))
    return name


def ollama_full_name(name):
    """Ollama's default tag: "llama3.2" means "llama3.2:latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _pull_progress(progress):
    if progress is None:
        return None

    def forward(update):
        if update.total and update.completed is not None:
            progress(update.completed, update.total)
    return forward


# -- functions the CLI calls (each returns JSON-ready data) ------------------------------------

def run_sync(coro):
    """Run a coroutine to the end from blocking code, even under a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    outcome = {}

    def worker():
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as exc:   # re-raised in the caller's thread
            outcome["error"] = exc
    thread = threading.Thread(target=worker, name="fmedge-run-sync")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def backend_models(config, timeout=5.0):
    """(names, error) of the models the configured HTTP backend serves; (None, None) for
    llamacpp, which loads files from this cache."""
    if config.llm_backend == "llamacpp":
        return None, None
    from ..errors import FmEdgeError

    async def ask():
        adapter = quick_adapter(config, timeout)
        try:
            return await adapter.list_models()
        finally:
            await adapter.close()
    try:
        return run_sync(ask()), None
    except FmEdgeError as exc:
        return None, str(exc)


def quick_adapter(config, timeout):
    """The configured HTTP backend's adapter with short timeouts, for checks and listings."""
    connect = min(2.0, timeout)
    if config.llm_backend == "ollama":
        from ..adapters.ollama import OllamaAdapter
        return OllamaAdapter(base_url=config.effective_llm_base_url(), model=config.llm_model,
                             connect_timeout=connect, read_timeout=timeout)
    from ..adapters.factory import create_adapter
    from ..adapters.openai import OpenAIAdapter
    if not config.llm_base_url:
        return create_adapter(config)     # raises the ConfigError that names the fix
    return OpenAIAdapter(base_url=config.llm_base_url, model=config.llm_model,
                         connect_timeout=connect, read_timeout=timeout)


def list_models(config):
    """``{cache_dir, count, used_bytes, max_bytes, models: [entry...]}`` (+ the backend's
    own models for ollama/openai: ``backend_models`` or ``backend_error``)."""
    cache = ModelCache(config=config)
    report = dict(cache.stats(), backend=config.llm_backend, models=cache.list())
    names, error = backend_models(config)
    if names is not None:
        report["backend_models"] = names
    if error is not None:
        report["backend_error"] = error
    return report


def add_model(config, path, name=None, progress=None):
    """Import a GGUF file: its entry (name, path, size, sha256, ...) plus ``evicted``."""
    cache = ModelCache(config=config)
    label = "adding %s" % (name or _name_from_file(str(path)))
    return cache.add(path, name=name, progress=_progress_or_bar(progress, label))


def pull_model(config, name, url=None, progress=None, sha256=None):
    """Download a model (or have Ollama pull it). Returns the cache entry plus
    ``already_cached, fetched_bytes, resumed_from, attempts, evicted``; with Ollama
    ``{name, backend: "ollama", pulled}``."""
    cache = ModelCache(config=config)
    bar = _progress_or_bar(progress, "pulling %s" % name)
    try:
        if url is None and config.llm_backend == "ollama":
            full, pulled = run_sync(cache._ensure_ollama(name, bar))
            return {"name": full, "backend": "ollama", "pulled": pulled}
        return cache.pull(name, url, sha256=sha256, progress=bar)
    finally:
        if hasattr(bar, "finish"):
            bar.finish()
        cache.close()


def remove_model(config, name):
    """``{removed: name}``; NotFoundError when the model is not cached."""
    if not ModelCache(config=config).remove(name):
        raise NotFoundError(_not_cached(name, config.model_cache_dir) +
                            ": `fm-edge models list` shows the cached ones")
    return {"removed": name}


def clear_models(config):
    """``{removed: [names], kept_in_use: [names], freed_bytes, partials_removed}``."""
    return ModelCache(config=config).clear()


def _progress_or_bar(progress, label):
    if progress is False:
        return None
    return progress if progress is not None else terminal_progress(label)
