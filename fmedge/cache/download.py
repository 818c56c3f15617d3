"""Resumable, verified model downloads: the transfer half of the model cache.

The rules come from what users of other systems lost (anchors.md §3 item 6):

- Bytes go to ``<name>.partial`` and stay there across failures and process restarts.
  Every retry asks for the rest with HTTP Range, so a cut costs the bytes in flight,
  never the bytes already on disk.
- A read that gets no byte for ``stall_timeout`` seconds fails the attempt (it is the
  socket read timeout). Failed attempts are retried with exponential backoff and full
  jitter. A failure after progress resets the count, as in Ollama: a slow link that keeps
  moving is not a dead one. ``retries`` failures in a row without a byte give up.
- The sha256 is computed while writing (no second pass over gigabytes) and compared
  with the expected one before anything is activated. A mismatch deletes the partial and
  the error names both hashes.
- The partial is fsynced before the caller renames it: a rename without fsync left a
  zero-length model after a power cut (reliability.md §1.1).

A partial remembers its origin in ``<name>.partial.json`` (where from, the expected
sha256, the server's validator). A partial whose origin no longer matches is discarded
rather than completed with another file's bytes.
"""

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

import urllib3

from ..http import body_chunks
from ..errors import (BusyError, CancelledError, ConfigError, FmEdgeError, NotFoundError,
                      OfflineError, UsageError)
from ..fsutil import atomic_write, storage_error
from ..sync.backoff import Backoff
from ..sync.client import ModelDownload

log = logging.getLogger("fmedge.models")

GGUF_MAGIC = b"GGUF"
PARTIAL_SUFFIX = ".partial"
META_SUFFIX = ".partial.json"
# Ollama declares a download part stalled after 30 s without a byte (anchors.md §1.7).
DEFAULT_STALL_TIMEOUT_S = 30.0
# Failures in a row without progress before giving up (Ollama: 6 per part).
DEFAULT_RETRIES = 6
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
URL_CONNECT_TIMEOUT_S = 10.0
URL_CHUNK = 1024 * 1024
FALLBACK_CHUNK = 64 * 1024
HASH_CHUNK = 1024 * 1024
# Batches of about HASH_CHUNK waiting for the hash thread: bounds the memory held (a few
# MiB; hashing runs at GB/s, so a deeper queue would only hold more).
_HASH_QUEUE_BATCHES = 4
# Bytes written between two background fdatasyncs (see _Flusher).
FLUSH_EVERY = 16 * 1024 * 1024
MAX_REDIRECTS = 10
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)\s*\Z")
_UNSATISFIED_RE = re.compile(r"bytes\s+\*/(\d+)\s*\Z")
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError)


class ChecksumMismatchError(FmEdgeError):
    """A downloaded or copied model is not the expected file; it was deleted, not used."""

    code = "checksum_mismatch"
    retryable = True        # a fresh download may succeed if the damage was in transit

    def __init__(self, message, expected=None, actual=None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class Transfer:
    """What one download did: ``fetched`` counts every byte received, retries included."""

    total: int
    fetched: int
    resumed_from: int
    attempts: int
    restarted: bool
    sha256: str


# -- the partial file ----------------------------------------------------------------------

class _Worker:
    """One daemon thread that runs ``work(item)`` for each item put, in order.

    The thread cannot raise to anyone, so its first error is kept; ``check()`` and
    ``finish()`` raise it. Items after an error are drained, not run, so a producer never
    blocks on a dead worker.
    """

    def __init__(self, work, name, depth):
        self._work = work
        self._queue = queue.Queue(maxsize=depth)    # bounds what waits
        self._error = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item, wait=True):
        """Queue ``item``; with ``wait=False``, False (and nothing queued) when full."""
        try:
            self._queue.put(item, block=wait)
        except queue.Full:
            return False
        return True

    def check(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def finish(self):
        """Wait until everything queued is done, then raise the worker's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._work(item)
                except Exception as exc:
                    self._error = exc


class _Hasher:
    """sha256 computed on a worker thread.

    hashlib releases the GIL on large buffers, so the hash runs on another core while
    the download thread receives and writes. Chunks are handed over in batches of about
    1 MiB: a thread wake-up per 16 KiB chunk of a slow link would cost more than it saves.
    """

    def __init__(self):
        self._hash = hashlib.sha256()
        self._worker = _Worker(self._update_all, "fmedge-sha256", _HASH_QUEUE_BATCHES)
        self._batch, self._batched = [], 0

    def update(self, data):
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= HASH_CHUNK:
            self._hand_over()

    def hexdigest(self):
        self.stop()
        return self._hash.hexdigest()

    def stop(self):
        self._hand_over()
        self._worker.finish()

    def _hand_over(self):
        if self._batch:
            self._worker.put(self._batch)
            self._batch, self._batched = [], 0

    def _update_all(self, batch):
        for data in batch:
            self._hash.update(data)


class _Flusher:
    """Writes the file to disk while the download goes on.

    Left alone, the kernel keeps a fast download in the page cache and the closing fsync
    writes all of it while nothing else happens (a third of a 200 MB download on
    loopback). An fdatasync on a worker thread every ``FLUSH_EVERY`` bytes overlaps those
    writes with the transfer, so the closing fsync finds only the tail. At most one flush
    waits behind the running one; further requests are dropped (those bytes are covered
    by the next flush or the closing fsync), so the download never waits for the disk here.
    """

    def __init__(self, fd):
        self._fd = fd
        self._worker = _Worker(self._flush, "fmedge-flush", 1)
        self._unflushed = 0

    def wrote(self, count):
        self._unflushed += count
        if self._unflushed >= FLUSH_EVERY:
            self._worker.check()    # a failing disk stops the download now, not at the end
            self._worker.put(True, wait=False)
            self._unflushed = 0

    def finish(self):
        """Wait for the flushes; raise a flush's error. Linux reports a write error to one
        fsync only: if the worker saw it, the closing fsync would not."""
        self._worker.finish()

    def _flush(self, _):
        _fdatasync(self._fd)


# macOS has no fdatasync; fsync does the same and more.
_fdatasync = getattr(os, "fdatasync", os.fsync)


class HashingFile:
    """A file written front to back whose sha256 follows the bytes as they are written.

    Opening hashes what is already there (a resumed partial). A ``seek`` back (the server
    would not resume) re-hashes the prefix that remains, so the digest always covers
    exactly bytes 0..length of the file. Written bytes go to disk in the background
    (``_Flusher``); ``fsync()`` makes all of them durable. ``close()`` stops both threads.
    """

    def __init__(self, raw):
        self._raw = raw
        self._hasher = None
        self.written = 0        # bytes written through this object
        try:
            self._rehash(raw.seek(0, os.SEEK_END))
        except BaseException:
            if self._hasher is not None:
                self._hasher.stop()
            raise
        self._flusher = _Flusher(raw.fileno())

    @property
    def length(self):
        return self._length

    def hexdigest(self):
        return self._hasher.hexdigest()

    def fsync(self):
        """Everything written is on disk when this returns (call it before any rename)."""
        self._raw.flush()
        self._flusher.finish()
        os.fsync(self._raw.fileno())

    def close(self):
        for stop in (self._hasher.stop, self._flusher.finish):
            try:
                stop()
            except Exception as exc:    # already failing; the next run re-hashes and fsyncs
                log.warning("a download helper thread failed: %s", exc)

    def seek(self, position, whence=os.SEEK_SET):
        target = self._raw.seek(position, whence)
        if target != self._length:
            self._rehash(target)
        return target

    def truncate(self, size=None):
        return self._raw.truncate(size)

    def tell(self):
        return self._raw.tell()

    def write(self, data):
        self._raw.write(data)
        self._hasher.update(bytes(data))    # a copy: the caller may reuse its buffer
        self._flusher.wrote(len(data))
        self._length += len(data)
        self.written += len(data)
        return len(data)

    def _rehash(self, length):
        if self._hasher is not None:
            self._hasher.stop()
        self._hasher = _Hasher()
        self._raw.seek(0)
        remaining = length
        while remaining > 0:
            chunk = self._raw.read(min(HASH_CHUNK, remaining))
            if not chunk:
                break
            self._hasher.update(chunk)
            remaining -= len(chunk)
        self._length = length - remaining
        self._raw.seek(self._length)


class Partial:
    """``<name>.partial`` and its origin file ``<name>.partial.json``."""

    def __init__(self, cache_dir, name):
        self.path = os.path.join(cache_dir, name + PARTIAL_SUFFIX)
        self.meta_path = os.path.join(cache_dir, name + META_SUFFIX)

    def prepare(self, origin):
        """Keep the partial if it came from ``origin``, else start empty; returns its meta."""
        meta = self._read_meta()
        if meta is not None and meta.get("origin") == origin:
            return meta
        self.discard()
        meta = {"origin": origin}
        self.save_meta(meta)
        return meta

    def save_meta(self, meta):
        atomic_write(self.meta_path, json.dumps(meta, sort_keys=True).encode("utf-8"), 0o644)

    def size(self):
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def discard(self):
        for path in (self.path, self.meta_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise storage_error(exc, path) from exc

    def open(self):
        """The partial opened for reading and writing, created if missing, never truncated."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        return os.fdopen(fd, "r+b")

    def _read_meta(self):
        try:
            with open(self.meta_path, encoding="utf-8") as handle:
                meta = json.load(handle)
        except (OSError, ValueError):
            return None     # no origin known: the partial cannot be trusted
        return meta if isinstance(meta, dict) else None


# -- where the bytes come from -------------------------------------------------------------

class CloudSource:
    """A model file served by the cloud (``GET /models/{name}/file``) via CloudClient."""

    def __init__(self, client, name, sha256):
        self.client = client
        self.name = name
        self.sha256 = sha256
        self.state = {}

    def origin(self):
        # The sha256 names the content: a partial resumes even if cloud_url changed since.
        return {"cloud_model": self.name, "sha256": self.sha256}

    def describe(self):
        return "%s/models/%s/file" % (self.client.base_url, self.name)

    def fetch(self, dest, offset, chunk_cb):
        return self.client.download_model(self.name, dest, offset, chunk_cb,
                                          expected_sha256=self.sha256)


class UrlSource:
    """A model file at any http(s) URL, fetched with urllib3 (TLS always verified).

    Redirects are followed (model hubs redirect to CDNs). A resume sends ``If-Range``
    with the validator (ETag or Last-Modified) of the earlier response, so a file that
    changed meanwhile comes back whole (200) instead of being spliced.
    """

    def __init__(self, url, sha256=None, ca_bundle=None, stall_timeout=DEFAULT_STALL_TIMEOUT_S,
                 connect_timeout=URL_CONNECT_TIMEOUT_S, validator=None, pool=None):
        self.url = _checked_url(url)
        self.sha256 = sha256
        self.state = {"validator": validator} if validator else {}
        self.etag_sha256 = None     # a server ETag that is a sha256 (some model hubs send one)
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=stall_timeout)
        self._pool = pool or urllib3.PoolManager(num_pools=2, maxsize=2,
                                                 ssl_context=_ssl_context(ca_bundle))

    def origin(self):
        return {"url": self.url, "sha256": self.sha256}

    def describe(self):
        return _without_query(self.url)

    def fetch(self, dest, offset, chunk_cb):
        response = self._request(offset)
        if response.status == 416:
            return self._unsatisfied(response, dest, offset, chunk_cb)
        complete = False
        try:
            start, total = self._span(response, offset)
            self._remember_validator(response)
            dest.seek(start)
            dest.truncate()
            written = self._stream(response, dest, start, total, chunk_cb)
            complete = True
        finally:
            if not complete:
                response.close()    # unread bytes: this connection cannot be reused
            response.release_conn()
        return ModelDownload(self.url, start, written, total, restarted=bool(offset) and not start)

    def _request(self, offset):
        headers = {"User-Agent": "fm-edge", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = "bytes=%d-" % offset
            if self.state.get("validator"):
                headers["If-Range"] = self.state["validator"]
        retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                redirect=MAX_REDIRECTS, raise_on_redirect=True)
        try:
            response = self._pool.request("GET", self.url, headers=headers, retries=retries,
                                          timeout=self._timeout, preload_content=False)
        except urllib3.exceptions.SSLError as exc:
            raise OfflineError("cannot verify the TLS certificate of %s (%s): if it uses a "
                               "private CA, set ca_bundle to its PEM file; fm-edge never turns "
                               "verification off" % (self.describe(), exc), retryable=False)
        except _NETWORK_ERRORS as exc:
            raise OfflineError("cannot download %s (%s): check the network; the download "
                               "resumes where it stopped" % (self.describe(), exc)) from exc
        if response.status not in (200, 206, 416):
            raise _status_error(response, self.describe())
        return response

    def _unsatisfied(self, response, dest, offset, chunk_cb):
        match = _UNSATISFIED_RE.match(response.headers.get("Content-Range", ""))
        response.drain_conn()
        response.release_conn()
        if match and int(match.group(1)) == offset:
            return ModelDownload(self.url, offset, 0, offset, restarted=False)
        # The partial is longer than the file (or the server cannot say): start over.
        done = self.fetch(dest, 0, chunk_cb)
        return ModelDownload(self.url, 0, done.written, done.total, restarted=True)

    def _span(self, response, offset):
        if response.status == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise OfflineError("%s answered a request for bytes from %d with Content-Range "
                                   "%r; the download will retry" % (
                                       self.describe(), offset,
                                       response.headers.get("Content-Range")))
            return offset, int(match.group(3))
        length = response.headers.get("Content-Length", "")
        if not length.isdigit():
            raise UsageError("%s sent the file without Content-Length, so a cut link could not "
                             "be told from the end of the file: download it another way and "
                             "use `fm-edge models add FILE`" % self.describe(),
                             code="download_unframed")
        return 0, int(length)

    def _remember_validator(self, response):
        etag = (response.headers.get("ETag") or "").strip()
        strong = etag if etag and not etag.startswith("W/") else ""
        validator = strong or response.headers.get("Last-Modified") or ""
        self.state = {"validator": validator} if validator else {}
        if _SHA256_RE.match(strong.strip('"')):
            self.etag_sha256 = strong.strip('"')

    def _stream(self, response, dest, start, total, chunk_cb):
        written = 0
        chunks = body_chunks(response, URL_CHUNK, FALLBACK_CHUNK)
        while True:
            try:
                chunk = next(chunks, None)
            except _NETWORK_ERRORS as exc:
                raise OfflineError("the download of %s broke after %d of %d bytes (%s); it "
                                   "resumes from there" % (self.describe(), start + written,
                                                           total, exc)) from exc
            if chunk is None:
                break
            if start + written + len(chunk) > total:
                raise OfflineError("%s sent more than the %d bytes it announced"
                                   % (self.describe(), total))
            dest.write(chunk)
            written += len(chunk)
            chunk_cb(start + written, total)
        if start + written != total:
            raise OfflineError("the download of %s ended after %d of %d bytes; it resumes "
                               "from there" % (self.describe(), start + written, total))
        return written


def _checked_url(url):
    parts = urllib.parse.urlsplit(str(url or "").strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("model URL %r is not an http(s) URL: give the full address of the "
                         ".gguf file, e.g. https://example.com/models/tiny.gguf" % (url,),
                         code="bad_url")
    return parts.geturl()


def _without_query(url):
    # Signed download URLs carry credentials in the query string: keep them out of messages.
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _ssl_context(ca_bundle):
    context = ssl.create_default_context()     # verifies certificates and host names
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("ca_bundle %r has no usable PEM certificates (%s): point it at "
                              "the CA's PEM file" % (ca_bundle, exc))
    return context


def _status_error(response, where):
    status = response.status
    response.drain_conn()
    response.release_conn()
    if status == 404:
        return NotFoundError("%s does not exist (HTTP 404): check the URL" % where)
    if status in (401, 403):
        return UsageError("%s refused the download (HTTP %d): the URL needs credentials or "
                          "a fresh signed link" % (where, status), code="download_refused")
    if status in (429, 503):
        err = BusyError("%s is busy (HTTP %d); the download will retry" % (where, status))
        err.retry_after = _retry_after(response.headers.get("Retry-After"))
        return err
    if status >= 500:
        return FmEdgeError("%s failed (HTTP %d); the download will retry" % (where, status),
                           code="download_server_error", retryable=True)
    return UsageError("%s answered HTTP %d to a download: check the URL" % (where, status),
                      code="download_refused")


def _retry_after(value):
    value = (value or "").strip()
    return float(value) if value.isdigit() else None


# -- the transfer loop ---------------------------------------------------------------------

@dataclass
class RetryPolicy:
    """How hard to try: injectable ``sleep`` and ``rng`` make tests instant and repeatable."""

    retries: int = DEFAULT_RETRIES
    sleep: object = time.sleep
    rng: object = None
    backoff_base: float = BACKOFF_BASE_S
    backoff_cap: float = BACKOFF_CAP_S


def transfer(source, partial, *, progress=None, policy=None, cancel=None):
    """Fetch ``source`` into ``partial`` (a Partial), resuming and retrying; fsync at the end.

    ``progress(done, total)`` is called from this thread as bytes arrive; ``cancel`` (a
    threading.Event) stops the download at the next chunk or retry, keeping the partial.
    """
    return _Download(source, partial, progress, policy or RetryPolicy(), cancel).run()


class _Download:
    """One call of ``transfer``: the attempts, the backoff between them, the partial."""

    def __init__(self, source, partial, progress, policy, cancel):
        self.source, self.partial, self.progress, self.policy = source, partial, progress, policy
        self.cancel = cancel or threading.Event()
        self.meta = partial.prepare(source.origin())
        if self.meta.get("state") and not source.state:
            source.state = dict(self.meta["state"])     # the validator of an earlier run

    def run(self):
        with self.partial.open() as raw, contextlib.closing(HashingFile(raw)) as dest:
            resumed_from = dest.length
            attempts, restarted, total = self._attempts(dest)
            _fsync(dest, self.partial.path)
            return Transfer(total, dest.written, resumed_from, attempts, restarted,
                            dest.hexdigest())

    def _attempts(self, dest):
        """Fetch from the end of ``dest`` until complete: (attempts, restarted, total)."""
        policy = self.policy
        backoff = Backoff(base=policy.backoff_base, cap=policy.backoff_cap, rng=policy.rng)
        attempts, failures, restarted = 0, 0, False
        while True:
            self._check_cancel(dest.length)
            attempts += 1
            before = dest.length
            try:
                done = self.source.fetch(dest, dest.length, self._on_chunk)
                return attempts, restarted or done.restarted, done.total
            except FmEdgeError as exc:
                if not exc.retryable:
                    raise
                if dest.length > before:    # progress: the link is flaky, not dead
                    failures = 0
                    backoff.reset()
                failures += 1
                if failures > policy.retries:
                    raise _gave_up(exc, self.source.describe(), failures) from exc
                policy.sleep(backoff.next_delay(getattr(exc, "retry_after", None)))
            except OSError as exc:          # a local write failed: disk full, I/O error
                raise storage_error(exc, self.partial.path) from exc
            finally:
                self._save_state()

    def _on_chunk(self, done, total):
        self._check_cancel(done)
        if self.progress is not None:
            self.progress(done, total)

    def _check_cancel(self, kept):
        if self.cancel.is_set():
            raise CancelledError("the download of %s was cancelled; %d bytes are kept in %s "
                                 "and the next attempt resumes from there"
                                 % (self.source.describe(), kept, self.partial.path))

    def _save_state(self):
        """Keep the server's validator, so a resume after a restart can send If-Range."""
        if self.source.state and self.meta.get("state") != self.source.state:
            self.meta["state"] = dict(self.source.state)
            self.partial.save_meta(self.meta)


def _fsync(dest, path):
    try:
        dest.fsync()
    except OSError as exc:
        raise storage_error(exc, path) from exc


def retrying(call, what, policy=None):
    """``call()`` retried like a transfer (for small requests such as a manifest)."""
    policy = policy or RetryPolicy()
    backoff = Backoff(base=policy.backoff_base, cap=policy.backoff_cap, rng=policy.rng)
    failures = 0
    while True:
        try:
            return call()
        except FmEdgeError as exc:
            failures += 1
            if not exc.retryable:
                raise
            if failures > policy.retries:
                raise _gave_up(exc, what, failures) from exc
            policy.sleep(backoff.next_delay(getattr(exc, "retry_after", None)))


def _gave_up(exc, what, failures):
    err = OfflineError("gave up on %s after %d failures in a row without progress (last: "
                       "%s); a download keeps its bytes and the next attempt resumes from them"
                       % (what, failures, exc))
    err.retry_after = getattr(exc, "retry_after", None)
    return err


# -- checks before activation --------------------------------------------------------------

def verify(partial, done, what, expected_size=None, expected_sha256=None):
    """Refuse a finished partial that is not the expected GGUF file, deleting it.

    ``done`` is the Transfer; ``what`` names the source in the message.
    """
    problem = None
    if expected_size is not None and done.total != expected_size:
        problem = ChecksumMismatchError(
            "the model from %s is %d bytes but its manifest says %d: it was deleted and "
            "nothing was activated; download it again, and if this repeats, the file on the "
            "server is damaged" % (what, done.total, expected_size))
    elif expected_sha256 and done.sha256 != expected_sha256:
        problem = ChecksumMismatchError(
            "the model from %s is corrupt: its sha256 is %s but %s was expected; the download "
            "was deleted and nothing was activated. Download it again; if the hash is the "
            "same again, the file on the server is damaged and must be uploaded again"
            % (what, done.sha256, expected_sha256), expected=expected_sha256,
            actual=done.sha256)
    else:
        problem = gguf_problem(partial.path, what)
    if problem is not None:
        partial.discard()
        raise problem


def gguf_problem(path, what):
    """A UsageError when ``path`` does not start with the GGUF magic, else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        return storage_error(exc, path)
    if head == GGUF_MAGIC:
        return None
    return UsageError("%s is not a GGUF model (it starts with %r, not %r): fm-edge caches "
                      "GGUF files only; convert the model to GGUF or pick the .gguf file"
                      % (what, head, GGUF_MAGIC), code="not_gguf")


def copy_hashing(src_path, partial, progress=None):
    """Copy a local file into ``partial`` (for imports from a USB stick), fsynced."""
    partial.prepare({"file": os.path.abspath(src_path)})
    total = os.path.getsize(src_path)
    with open(src_path, "rb") as src, partial.open() as raw:
        raw.truncate(0)
        with contextlib.closing(HashingFile(raw)) as dest:
            _copy(src, src_path, dest, partial, progress, total)
            _fsync(dest, partial.path)
            return Transfer(dest.length, dest.written, 0, 1, False, dest.hexdigest())


def _copy(src, src_path, dest, partial, progress, total):
    while True:
        try:
            chunk = src.read(URL_CHUNK)
        except OSError as exc:
            raise UsageError("cannot read %s: %s (is the USB stick still plugged in?)"
                             % (src_path, exc.strerror or exc), code="unreadable") from exc
        if not chunk:
            return
        try:
            dest.write(chunk)
        except OSError as exc:
            raise storage_error(exc, partial.path) from exc
        if progress is not None:
            progress(dest.length, total)
