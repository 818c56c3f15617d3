"""CloudClient: the device's side of the cloud sync protocol (design.md §8), over urllib3.

One method per protocol call, each blocking (the SyncManager runs them in a thread) and
each either returning parsed data or raising one of fm-edge's errors:

- 401/403 → AuthError (fix the api_key; retrying will not help);
- 404 → NotFoundError; 413 → UsageError code ``batch_too_large`` (split the batch);
- 429/503 → BusyError (retryable), 5xx → retryable FmEdgeError;
- refused, timed out, cut mid-body, not JSON, TLS not trusted → OfflineError (retryable).

Every error raised here carries ``retry_after`` (seconds from the ``Retry-After`` header,
or None) and ``cloud_status`` (the HTTP status, or None when no answer came back).

urllib3's own retries are off: backoff belongs to the SyncManager, which knows what a retry
costs. TLS certificates are always verified; ``ca_bundle`` adds a private CA and there is
deliberately no way to turn verification off (reliability.md §3.7).
"""

import datetime
import email.utils
import gzip
import hashlib
import http.client
import json
import os
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Optional

import urllib3
from urllib3.util.ssl_ import resolve_cert_reqs

from ..http import body_chunks
from ..errors import (AuthError, BusyError, ConfigError, FmEdgeError, NotFoundError,
                      OfflineError, UsageError)

API_PATH = "/api/v1/edge"
MAX_BATCH_RESULTS = 500                 # protocol limit per POST /results
MAX_BATCH_BYTES = 1024 * 1024           # protocol limit on the gzip body
MAX_JSON_REPLY_BYTES = 16 * 1024 * 1024  # a reply larger than this is not a sync answer
MAX_PIPELINE_BYTES = 8 * 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255
DOWNLOAD_CHUNK = 64 * 1024
DOWNLOAD_READ1_CHUNK = 1024 * 1024
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)\s*\Z")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)\s*\Z")

# Everything that means "no usable answer came back": the link, not the cloud, failed.
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException)


@dataclass(frozen=True)
class PipelineDownload:
    """A pipeline document as served: the exact bytes, whose sha256 matched the ETag."""

    pipeline_id: str
    body: bytes
    sha256: str
    version: Optional[str]


@dataclass(frozen=True)
class ModelDownload:
    """What ``download_model`` wrote: bytes ``start`` .. ``start + written`` of ``total``."""

    name: str
    start: int
    written: int
    total: int
    restarted: bool     # True when a resume was refused and the file was fetched from 0


def parse_retry_after(value, now=None):
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:      # RFC 9110 dates are GMT; a naive one is taken as such
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _cloud_error(cls, message, status=None, retry_after=None, **kwargs):
    err = cls(message, **kwargs)
    err.cloud_status = status
    err.retry_after = retry_after
    return err


def _tls_reason(exc):
    """The certificate problem in words, dug out of urllib3's wrapping."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current), True
        todo.extend([current.__cause__, current.__context__])
        todo.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
    return str(exc), False


def _unquote_etag(value):
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


class CloudClient:
    """Talks to ``{cloud_url}/api/v1/edge`` as one device. Thread-safe; blocking calls."""

    def __init__(self, cloud_url, api_key, device_id, ca_bundle=None, connect_timeout=5,
                 read_timeout=30, pool=None, clock=None):
        self.base_url = _base_url(cloud_url)
        self.device_id = _checked_device_id(device_id)
        self._api_key = _checked_api_key(api_key)
        self.ca_bundle = ca_bundle or None
        self._clock = clock or time.time
        self._timeout = urllib3.Timeout(connect=float(connect_timeout), read=float(read_timeout))
        self._timeouts = (connect_timeout, read_timeout)
        self._pool = _checked_pool(pool) if pool is not None else _new_pool(self.ca_bundle)
        self._owns_pool = pool is None
        self._user_agent = "fm-edge/" + _version()

    def __repr__(self):   # never shows the api_key
        return "CloudClient(%r, device_id=%r)" % (self.base_url, self.device_id)

    def close(self):
        if self._owns_pool:
            self._pool.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- protocol calls ----------------------------------------------------------------------

    def ping(self):
        """Reachability and auth check; returns the cloud's answer (a dict)."""
        return self._json_call("GET", "/ping")

    def register(self, info):
        """Describe this device (name, version, platform, capabilities)."""
        body = dict(info)
        body.setdefault("device_id", self.device_id)
        return self._json_call("POST", "/devices/register", body=body)

    def heartbeat(self, info):
        """Report status, queue depth, free disk, cached pipeline versions."""
        path = "/devices/%s/heartbeat" % _segment(self.device_id)
        return self._json_call("POST", path, body=dict(info))

    def pipeline_changes(self, since=0):
        """Pipelines changed after cursor ``since``: {changes, cursor, more, reset}."""
        since = int(since or 0)
        answer = self._json_call("GET", "/pipelines?since=%d" % since)
        return _checked_changes(answer, self._bad_reply)

    def get_pipeline(self, pipeline_id, etag=None):
        """The document (a PipelineDownload), or None when ``etag`` is still current (304)."""
        path = "/pipelines/" + _segment(pipeline_id)
        headers = {"If-None-Match": '"%s"' % _unquote_etag(etag)} if etag else {}
        response = self._request("GET", path, headers=headers, ok=(200, 304))
        try:
            if response.status == 304:
                return None
            body = self._read_bounded(response, MAX_PIPELINE_BYTES, "GET", path)
            served_etag = _unquote_etag(response.headers.get("ETag"))
            version = response.headers.get("X-Pipeline-Version")
        finally:
            _release(response)
        sha = hashlib.sha256(body).hexdigest()
        if served_etag and served_etag != sha:
            raise self._bad_reply("GET", path, "the document's sha256 %s does not match its "
                                  "ETag %s (damaged in transit)" % (sha, served_etag))
        return PipelineDownload(pipeline_id, body, sha, version)

    def upload_results(self, batch, idempotency_key, texts=None):
        """Send one batch; returns {accepted, duplicate, rejected, replayed}.

        ``accepted`` and ``duplicate`` list run ids the cloud now holds (mark them synced);
        ``rejected`` lists {index, run_id, reason} for results it will never take.
        Resend a batch that got no answer with the same ``idempotency_key``. ``texts``
        (each result already serialized as strict JSON) saves serializing them again.
        """
        key = _checked_idempotency_key(idempotency_key)
        items = list(batch)
        if not items:
            return {"accepted": [], "duplicate": [], "rejected": [], "replayed": False}
        body = _gzip_batch(items, texts)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
                   "Idempotency-Key": key}
        response = self._request("POST", "/results", body=body, headers=headers)
        replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
        answer = self._read_json(response, "POST", "/results")
        return dict(_checked_upload_answer(answer, self._bad_reply), replayed=replayed)

    def model_manifest(self, name):
        """{name, size, sha256} of a model the cloud serves."""
        path = "/models/" + _segment(name)
        answer = self._json_call("GET", path)
        size, sha = answer.get("size"), answer.get("sha256")
        if not isinstance(size, int) or size < 0 or not _SHA256_RE.match(str(sha)):
            raise self._bad_reply("GET", path, "the manifest lacks a valid size and sha256")
        return answer

    def download_model(self, name, dest_fileobj, offset=0, chunk_cb=None, expected_sha256=None):
        """Write the model file into ``dest_fileobj`` from byte ``offset`` (HTTP Range).

        ``dest_fileobj`` must be seekable: when the cloud will not resume (it answers 200,
        or the file changed since ``expected_sha256``), the file is truncated and fetched
        from 0 instead of appending a different file's bytes. ``chunk_cb(done, total)``
        reports progress. On a broken link the bytes written so far stay in the file and
        OfflineError is raised: call again with ``offset=dest_fileobj.tell()``.
        """
        path = "/models/%s/file" % _segment(name)
        headers = _range_headers(offset, expected_sha256)
        response = self._request("GET", path, headers=headers, ok=(200, 206, 416))
        if response.status == 416:
            total = self._unsatisfied_total(response, path)
            if total == offset:
                return ModelDownload(name, offset, 0, total, restarted=False)
            # The partial file is longer than the model: it is not a prefix of it.
            return self._restart_download(name, dest_fileobj, chunk_cb)
        complete = False
        try:
            start, total = self._served_span(response, offset, path)
            dest_fileobj.seek(start)
            dest_fileobj.truncate()
            written = self._stream_into(response, dest_fileobj, start, total, chunk_cb, path)
            complete = True
        finally:
            _release(response, broken=not complete)
        return ModelDownload(name, start, written, total, restarted=bool(offset) and start == 0)

    # -- download helpers --------------------------------------------------------------------

    def _restart_download(self, name, dest_fileobj, chunk_cb):
        result = self.download_model(name, dest_fileobj, 0, chunk_cb)
        return ModelDownload(name, 0, result.written, result.total, restarted=True)

    def _unsatisfied_total(self, response, path):
        header = response.headers.get("Content-Range", "")
        _release(response)
        match = _UNSATISFIED_RANGE_RE.match(header)
        if not match:
            raise self._bad_reply("GET", path, "416 without `Content-Range: bytes */SIZE`")
        return int(match.group(1))

    def _served_span(self, response, offset, path):
        """(first byte, total size) of what the cloud is sending."""
        if response.status == 200:
            length = response.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise self._bad_reply("GET", path, "the model file came without Content-Length")
            return 0, int(length)
        match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise self._bad_reply("GET", path, "asked for bytes from %d, got Content-Range %r"
                                  % (offset, response.headers.get("Content-Range")))
        return offset, int(match.group(3))

    def _stream_into(self, response, dest, start, total, chunk_cb, path):
        written = 0
        chunks = body_chunks(response, DOWNLOAD_READ1_CHUNK, DOWNLOAD_CHUNK)
        while True:
            try:
                chunk = next(chunks, None)
            except _NETWORK_ERRORS as exc:
                raise self._offline("GET", path, exc) from exc
            if chunk is None:
                break
            if start + written + len(chunk) > total:
                raise self._bad_reply("GET", path, "the cloud sent more than the %d bytes it "
                                      "announced" % total)
            dest.write(chunk)   # a local write error (disk full) propagates as it is
            written += len(chunk)
            if chunk_cb is not None:
                chunk_cb(start + written, total)
        if start + written != total:
            raise self._offline("GET", path, "the body ended after %d of %d bytes"
                                % (start + written, total))
        return written

    # -- plumbing ----------------------------------------------------------------------------

    def _json_call(self, method, path, body=None):
        headers = {}
        data = None
        if body is not None:
            try:
                data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise UsageError("the body of %s %s cannot be sent as JSON (%s): pass plain "
                                 "dicts, lists, text and finite numbers" % (method, path, exc))
            headers["Content-Type"] = "application/json"
        response = self._request(method, path, body=data, headers=headers)
        answer = self._read_json(response, method, path)
        if not isinstance(answer, dict):
            raise self._bad_reply(method, path, "the reply is not a JSON object")
        return answer

    def _request(self, method, path, body=None, headers=None, ok=(200,)):
        """Send one request; return the open response if its status is in ``ok``."""
        if not self._api_key:
            raise _cloud_error(AuthError, "no api_key is set for device %s: set one with "
                               "`fm-edge config set api_key ...`" % self.device_id)
        all_headers = {"Authorization": "Bearer " + self._api_key,
                       "X-Device-Id": self.device_id, "User-Agent": self._user_agent,
                       "Accept": "application/json"}
        all_headers.update(headers or {})
        try:
            response = self._pool.request(method, self.base_url + path, body=body,
                                          headers=all_headers, timeout=self._timeout,
                                          retries=False, redirect=False, preload_content=False)
        except urllib3.exceptions.SSLError as exc:
            raise self._tls_error(exc) from exc
        except _NETWORK_ERRORS as exc:
            raise self._offline(method, path, exc) from exc
        if response.status in ok:
            return response
        raise self._status_error(method, path, response)

    def _read_bounded(self, response, limit, method, path):
        try:
            data = response.read(limit + 1)
        except _NETWORK_ERRORS as exc:
            _release(response, broken=True)
            raise self._offline(method, path, exc) from exc
        if len(data) > limit:
            _release(response, broken=True)
            raise self._bad_reply(method, path, "the reply is larger than %d bytes" % limit)
        return data

    def _read_json(self, response, method, path):
        try:
            data = self._read_bounded(response, MAX_JSON_REPLY_BYTES, method, path)
        finally:
            _release(response)
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise self._bad_reply(method, path, "the reply is not valid JSON (%s)" % exc)

    # -- error mapping -----------------------------------------------------------------------

    def _offline(self, method, path, cause):
        what = cause if isinstance(cause, str) else _describe_network_error(cause, self._timeouts)
        return _cloud_error(OfflineError, "cannot reach the cloud at %s (%s %s: %s): results "
                            "stay queued and sync retries by itself; check the network and "
                            "cloud_url" % (self.base_url, method, path, what))

    def _bad_reply(self, method, path, what):
        return _cloud_error(OfflineError, "the cloud at %s sent a reply fm-edge cannot use "
                            "(%s %s: %s); sync will retry" % (self.base_url, method, path, what),
                            code="bad_response")

    def _tls_error(self, exc):
        reason, is_certificate = _tls_reason(exc)
        where = self.base_url
        if not is_certificate:
            message = ("TLS handshake with the cloud at %s failed (%s): check that cloud_url "
                       "has the right scheme and port" % (where, reason))
        elif "not yet valid" in reason or "expired" in reason:
            message = ("cannot verify the TLS certificate of the cloud at %s: %s. This "
                       "device's clock reads %s: if that is wrong, fix the clock (NTP); results "
                       "stay queued" % (where, reason, time.strftime(
                           "%Y-%m-%d %H:%M UTC", time.gmtime(self._clock()))))
        else:
            trusted = ("the CA bundle %s" % self.ca_bundle) if self.ca_bundle else \
                "this system's CA certificates"
            message = ("cannot verify the TLS certificate of the cloud at %s (%s): it is not "
                       "trusted by %s. If the cloud uses a private CA, point the config field "
                       "ca_bundle at its PEM file (`fm-edge config set ca_bundle "
                       "/path/to/ca.pem`); fm-edge never turns verification off"
                       % (where, reason, trusted))
        return _cloud_error(OfflineError, message, code="tls_error")

    def _status_error(self, method, path, response):
        status = response.status
        detail = _error_detail(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self._clock())
        where = "HTTP %d on %s %s: %s" % (status, method, path, detail)
        wait = "" if retry_after is None else "; retrying after %g s" % retry_after

        def make(cls, text, **kwargs):
            return _cloud_error(cls, text, status, retry_after, **kwargs)

        if status in (401, 403):
            return make(AuthError, "the cloud at %s refused api_key for device %s (%s): set a "
                        "valid key with `fm-edge config set api_key ...`"
                        % (self.base_url, self.device_id, where))
        if status == 404:
            return make(NotFoundError, "the cloud has no such thing (%s)" % where)
        if status == 408:   # the cloud gave up waiting for our bytes: a slow link
            return make(OfflineError, "the cloud timed out reading the request (%s); sync "
                        "will retry" % where)
        if status == 413:
            return make(UsageError, "the request is too large for the cloud (%s): send fewer "
                        "results per batch" % where, code="batch_too_large")
        if status == 429:
            return make(BusyError, "the cloud is rate-limiting device %s (%s)%s"
                        % (self.device_id, where, wait), code="cloud_busy")
        if status == 503:
            return make(BusyError, "the cloud is temporarily unavailable (%s)%s"
                        % (where, wait), code="cloud_unavailable")
        if status >= 500:
            return make(FmEdgeError, "the cloud failed (%s); sync will retry%s"
                        % (where, wait), code="cloud_error", retryable=True)
        if 300 <= status < 400:
            return make(FmEdgeError, "the cloud redirected %s %s to %s: set cloud_url to the "
                        "final address" % (method, path, response.headers.get("Location")),
                        code="cloud_redirect")
        return make(UsageError, "the cloud refused the request (%s)" % where,
                    code="cloud_rejected")


# -- module helpers ------------------------------------------------------------------------------

def _version():
    # Looked up at construction, not import, so fmedge/__init__ may import this module.
    import fmedge
    return getattr(fmedge, "__version__", "0")


def _base_url(cloud_url):
    text = (cloud_url or "").strip().rstrip("/")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("cloud_url %r is not an http(s) URL: set it with `fm-edge config set "
                          "cloud_url https://studio.example.com`" % (cloud_url,))
    return text if text.endswith(API_PATH) else text + API_PATH


def _checked_device_id(device_id):
    if not isinstance(device_id, str) or not re.match(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z",
                                                      device_id):
        raise ConfigError("device_id %r cannot be sent to the cloud: use letters, digits, "
                          "'.', '_', ':' and '-' (at most 128 characters)" % (device_id,))
    return device_id


def _checked_api_key(api_key):
    key = api_key or ""
    if any(ord(ch) < 0x21 or ord(ch) > 0x7e for ch in key):
        raise ConfigError("api_key contains spaces or characters that cannot go in an HTTP "
                          "header: set it again with `fm-edge config set api_key ...`")
    return key


def _new_pool(ca_bundle):
    context = None
    if ca_bundle:
        if not os.path.isfile(ca_bundle):
            raise ConfigError("ca_bundle %r is not a file: point it at a PEM file of CA "
                              "certificates (`fm-edge config set ca_bundle /path/ca.pem`)"
                              % ca_bundle)
        # The system's CAs plus the private one: ca_bundle adds trust, it never replaces it.
        context = ssl.create_default_context()
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("ca_bundle %r has no usable PEM certificates (%s): point it at "
                              "the CA's PEM file" % (ca_bundle, exc))
    return urllib3.PoolManager(num_pools=4, maxsize=4, block=False, ssl_context=context)


def _checked_pool(pool):
    """A caller's pool is fine unless it was built to skip certificate checks."""
    settings = getattr(pool, "connection_pool_kw", {})
    if resolve_cert_reqs(settings.get("cert_reqs")) != ssl.CERT_REQUIRED or \
            settings.get("assert_hostname") is False:
        raise ConfigError("the connection pool given to CloudClient does not verify TLS "
                          "certificates: fm-edge always verifies them (use ca_bundle for a "
                          "private CA)")
    return pool


def _segment(value):
    if not isinstance(value, str) or not value:
        raise UsageError("an id sent to the cloud must be non-empty text, got %r" % (value,))
    return urllib.parse.quote(value, safe="")


def _checked_idempotency_key(key):
    if not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY or \
            not key.isprintable() or not key.isascii():
        raise UsageError("idempotency_key %r must be printable ASCII text of 1 to %d "
                         "characters (e.g. a UUID)" % (key, MAX_IDEMPOTENCY_KEY))
    return key


def _gzip_batch(items, texts=None):
    if len(items) > MAX_BATCH_RESULTS:
        raise _cloud_error(UsageError, "a batch of %d results is over the protocol limit of "
                           "%d: split it" % (len(items), MAX_BATCH_RESULTS),
                           code="batch_too_large")
    if texts is not None and len(texts) == len(items):
        data = '{"results":[' + ",".join(texts) + "]}"
    else:
        try:
            data = json.dumps({"results": items}, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _cloud_error(UsageError, "a result in the batch cannot be sent as JSON "
                               "(%s): fix or quarantine that result" % exc, code="bad_result")
    # mtime=0: the same batch always compresses to the same bytes. Level 1: JSON still
    # shrinks several-fold, at a fraction of level 6's CPU on a small device.
    body = gzip.compress(data.encode("utf-8"), compresslevel=1, mtime=0)
    if len(body) > MAX_BATCH_BYTES:
        raise _cloud_error(UsageError, "a batch of %d results is %d bytes compressed, over the "
                           "protocol limit of %d: split it" % (len(items), len(body),
                                                               MAX_BATCH_BYTES),
                           code="batch_too_large")
    return body


def _range_headers(offset, expected_sha256):
    if offset < 0:
        raise UsageError("download offset must be 0 or more, got %d" % offset)
    if not offset:
        return {}
    headers = {"Range": "bytes=%d-" % offset}
    if expected_sha256:   # resume only if the file is still the one we started on
        headers["If-Range"] = '"%s"' % expected_sha256
    return headers


def _checked_changes(answer, bad_reply):
    changes, cursor = answer.get("changes"), answer.get("cursor")
    if not isinstance(changes, list) or not isinstance(cursor, int) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), str) and "sha256" in c
            for c in changes):
        raise bad_reply("GET", "/pipelines", "the changes feed lacks changes[] or cursor")
    answer.setdefault("more", False)
    answer.setdefault("reset", False)
    return answer


def _checked_upload_answer(answer, bad_reply):
    lists = {name: answer.get(name) for name in ("accepted", "duplicate", "rejected")}
    if not all(isinstance(value, list) for value in lists.values()) or not all(
            isinstance(item, dict) and "reason" in item for item in lists["rejected"]):
        raise bad_reply("POST", "/results", "the answer lacks accepted[], duplicate[] or "
                        "rejected[{reason}]")
    return lists


def _error_detail(response):
    """The cloud's own error message, or the HTTP reason; reads at most 64 KB."""
    data = b""
    try:
        data = response.read(64 * 1024)
    except _NETWORK_ERRORS:
        pass
    finally:
        # Keep the connection when the whole (small) error body was read.
        _release(response, broken=not data or len(data) >= 64 * 1024)
    try:
        message = json.loads(data.decode("utf-8"))["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.reason or "no details"


def _describe_network_error(exc, timeouts):
    # NewConnectionError subclasses ConnectTimeoutError in urllib3, so it is tested first.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "connection failed: %s" % _root_message(exc)
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "no connection within connect_timeout=%gs" % timeouts[0]
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "no reply within read_timeout=%gs" % timeouts[1]
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection broken: %s" % _root_message(exc)
    return _root_message(exc)


def _root_message(exc):
    """The innermost cause in plain words ('Connection refused'), not urllib3's wrapping."""
    current = exc
    while True:
        inner = current.__cause__ or (current.args[-1] if current.args and isinstance(
            current.args[-1], BaseException) else None)
        if inner is None or inner is current:
            break
        current = inner
    if isinstance(current, OSError) and current.strerror:
        return current.strerror
    return str(current) or type(current).__name__


def _release(response, broken=False):
    """Hand the connection back to the pool, clean: a small leftover body (an error's
    JSON) is read off; an abandoned large one closes the connection instead."""
    if broken:
        response.close()
    else:
        response.drain_conn()
    response.release_conn()


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)
