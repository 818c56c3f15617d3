"""urllib3 plumbing shared by the HTTP adapters (Ollama, OpenAI-compatible servers).

Two problems are solved here once:

- urllib3 blocks, so every request runs on a worker thread the adapter owns. A generation
  that takes minutes never holds a thread of the event loop's default executor, which the
  rest of the runtime (SQLite, files) shares.
- Cancelling the awaiting task must stop the generation on the server, not just stop
  waiting for it (a run timeout has to free the model). Cancellation shuts the request's
  socket down; that wakes the worker's blocking read at once, and the server sees its
  client leave and stops generating.
"""

import asyncio
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, MaxRetryError,
                                NameResolutionError, NewConnectionError, ReadTimeoutError,
                                SSLError)

from .. import __version__
from ..errors import BackendUnavailableError, BusyError, LLMError

# Seconds to open a TCP connection: the backend is on this device or the LAN, so a
# healthy one accepts at once; waiting longer only delays the "not running" message.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Seconds between two bytes of an answer. A non-streamed generation sends nothing until
# it is finished: a Pi-class CPU needs minutes for a cold model load plus 512 tokens.
# The run's execution_timeout (300 s by default) normally fires first.
DEFAULT_READ_TIMEOUT = 300.0
# Requests one adapter runs at once (threads and pooled connections). Ollama itself
# runs one request per model at a time by default (OLLAMA_NUM_PARALLEL=1).
DEFAULT_MAX_CONNECTIONS = 4
# A streamed line longer than this means the server is not speaking NDJSON/SSE.
MAX_LINE_BYTES = 16 * 1024 * 1024

USER_AGENT = f"fm-edge/{__version__}"


class BackendBusyError(LLMError, BusyError):
    """The backend refused work for now (HTTP 503 queue full, 429): retry later.

    Both an LLMError (LLM nodes catch those) and a BusyError (same meaning as the
    runtime's own "busy").
    """

    code = "busy"
    retryable = True


class HttpStatusError(Exception):
    """A 4xx/5xx answer. Adapters turn it into an FmEdgeError: they know the model."""

    def __init__(self, method, url, status, body):
        super().__init__(f"{method} {url} answered HTTP {status}")
        self.method = method
        self.url = url
        self.status = status
        self.body = body

    def json(self):
        """The body as a JSON object, or None when it is not one."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def text(self, limit=500):
        return self.body[:limit].decode("utf-8", "replace").strip()


def decode_json(raw, where):
    """Parse one JSON object sent by a backend; anything else is an LLMError."""
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        snippet = bytes(raw[:200]).decode("utf-8", "replace")
        raise LLMError(f"{where} sent something that is not a JSON object: {snippet!r}; "
                       "check that the URL points at the right server")
    return value


# -- Cancellation -------------------------------------------------------------------------
# Which request a connection currently serves. One lock for all adapters: it is held for
# a few attribute writes per request, and it makes "is this socket still mine?" exact
# when a cancel races a request finishing and its connection being reused.
_owner_lock = threading.Lock()
_worker = threading.local()


class _CancelSwitch:
    """Cancels one request by shutting its socket down, from any thread."""

    def __init__(self):
        self.cancelled = False
        self.finished = False
        self._connections = []

    def claim(self, conn):
        """Record that ``conn`` serves this request. Caller holds ``_owner_lock``."""
        conn.fmedge_owner = self
        if conn not in self._connections:
            self._connections.append(conn)

    def cancel(self):
        with _owner_lock:
            if self.cancelled or self.finished:
                self.cancelled = True
                return
            self.cancelled = True
            for conn in self._connections:
                if conn.fmedge_owner is self:
                    _shut_down(conn)

    def finish(self):
        """The request is over: its connection may now serve others, so never shut it."""
        with _owner_lock:
            self.finished = True
            for conn in self._connections:
                if conn.fmedge_owner is self:
                    conn.fmedge_owner = None
            self._connections = []


def _shut_down(conn):
    # shutdown() rather than close(): it wakes a recv() blocked in another thread and
    # leaves the file descriptor alone, so no other socket can inherit its number.
    sock = conn.sock
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or reset: the request is stopped either way
    conn.fmedge_shut = True


class _CancellableConnection:
    """Mixin for urllib3 connections: registers each with the request using it."""

    fmedge_owner = None
    fmedge_shut = False

    def connect(self):
        self._fmedge_claim()
        super().connect()
        with _owner_lock:
            self.fmedge_shut = False
            owner = self.fmedge_owner
            if owner is not None and owner.cancelled and not owner.finished:
                _shut_down(self)  # cancelled while connecting: stop before sending

    def request(self, *args, **kwargs):
        self._fmedge_claim()
        return super().request(*args, **kwargs)

    def _fmedge_claim(self):
        switch = getattr(_worker, "switch", None)
        with _owner_lock:
            if self.fmedge_shut:
                # A late cancel of the previous request shut this pooled socket down:
                # closing it makes http.client open a fresh one for this request.
                self.close()
                self.fmedge_shut = False
            self.fmedge_owner = None
            if switch is None:
                return
            if switch.cancelled:
                raise ConnectionAbortedError("request cancelled before it was sent")
            switch.claim(self)


class _HTTPConnection(_CancellableConnection, HTTPConnection):
    pass


class _HTTPSConnection(_CancellableConnection, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _run_cancellable(switch, fn, args):
    """Worker-thread side: run ``fn`` with ``switch`` reachable by its connections."""
    _worker.switch = switch
    try:
        return fn(*args)
    finally:
        _worker.switch = None
        switch.finish()


_END = object()  # the worker read the whole streamed answer


# -- The client ---------------------------------------------------------------------------
class HttpClient:
    """One backend's base URL, urllib3 PoolManager and worker threads.

    ``name`` and ``start_hint`` go into error messages ("Ollama is not running at
    <url> (...); <start_hint>").
    """

    def __init__(self, base_url, name, start_hint, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 read_timeout=DEFAULT_READ_TIMEOUT, max_connections=DEFAULT_MAX_CONNECTIONS,
                 headers=None):
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.start_hint = start_hint
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        self._headers.update(headers or {})
        # retries=False: a retry is the pipeline's decision (retry_config), not ours.
        # TLS certificates are verified with the system store (urllib3's default).
        self._pool = urllib3.PoolManager(
            num_pools=2, maxsize=max_connections, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))
        self._pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._executor = ThreadPoolExecutor(max_connections,
                                            thread_name_prefix=f"fmedge-{name.lower()}")
        self._switches = set()
        self._closed = False

    @property
    def where(self):
        return f"{self.name} at {self.base_url}"

    async def request_json(self, method, path, payload=None):
        """Send one request and return the decoded JSON object it answers with.

        Raises HttpStatusError for 4xx/5xx and LLMError subclasses for transport failures.
        """
        url = self.base_url + path
        status, body = await self._off_loop(self._fetch, method, url, _encode(payload))
        if status >= 400:
            raise HttpStatusError(method, url, status, body)
        return decode_json(body, self.where)

    async def lines(self, method, path, payload=None):
        """Yield the lines (bytes, without the newline) of a streamed answer.

        Stopping early (break, aclose, cancellation) shuts the connection down, so the
        server stops generating. Raises like :meth:`request_json`.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        switch = _CancelSwitch()

        def deliver(item):  # runs on the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody reads the rest
                switch.cancel()

        url = self.base_url + path
        self._switches.add(switch)
        future = loop.run_in_executor(self._executor, _run_cancellable, switch, self._pump,
                                      (method, url, _encode(payload), deliver))
        complete = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    complete = True
                    break
                if isinstance(item, BaseException):
                    raise self._translate(item)
                for line in item:
                    yield line
            await future
        finally:
            self._switches.discard(switch)
            if not complete:
                switch.cancel()
                future.cancel()

    def close(self):
        """Stop every request in flight and release the connections. Safe to call twice."""
        self._closed = True
        for switch in list(self._switches):
            switch.cancel()
        self._executor.shutdown(wait=False)
        self._pool.clear()

    # -- worker-thread side ----------------------------------------------------------
    def _fetch(self, method, url, body):
        response = self._pool.request(method, url, body=body, headers=self._headers)
        return response.status, response.data

    def _pump(self, method, url, body, deliver):
        """Read a streamed answer and hand its lines to the event loop, in batches."""
        try:
            response = self._pool.request(method, url, body=body, headers=self._headers,
                                          preload_content=False)
        except Exception as exc:  # handed to the awaiting coroutine, which maps it
            deliver(exc)
            return
        try:
            if response.status >= 400:
                deliver(HttpStatusError(method, url, response.status, response.read()))
                return
            for batch in _line_batches(_chunks(response), self.where):
                deliver(batch)
            deliver(_END)
        except Exception as exc:
            deliver(exc)
        finally:
            response.close()

    # -- event-loop side -------------------------------------------------------------
    async def _off_loop(self, fn, *args):
        self._check_open()
        switch = _CancelSwitch()
        self._switches.add(switch)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, _run_cancellable, switch, fn,
                                               args)
        except asyncio.CancelledError:
            switch.cancel()
            raise
        except (HTTPError, OSError) as exc:
            raise self._translate(exc) from exc
        finally:
            self._switches.discard(switch)

    def _check_open(self):
        if self._closed:
            raise LLMError(f"the {self.name} adapter for {self.base_url} is closed; "
                           "create a new one", retryable=False)

    def _translate(self, exc):
        """Map a urllib3/socket failure to the error a user can act on."""
        if isinstance(exc, MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        if not isinstance(exc, (HTTPError, OSError)):
            return exc  # already ours (LLMError, HttpStatusError)
        where = self.where
        # NameResolutionError < NewConnectionError < ConnectTimeoutError: order matters.
        if isinstance(exc, NameResolutionError):
            return BackendUnavailableError(
                f"{where}: the host name does not resolve ({_detail(exc)}); "
                "check the URL", retryable=False)
        if isinstance(exc, NewConnectionError):
            return BackendUnavailableError(
                f"{self.name} is not running at {self.base_url} ({_detail(exc)}); "
                f"{self.start_hint}")
        if isinstance(exc, ConnectTimeoutError):
            return BackendUnavailableError(
                f"{where} did not accept a connection within {self.connect_timeout} s; "
                f"check that the host is up, or raise connect_timeout")
        if isinstance(exc, ReadTimeoutError):
            return LLMError(
                f"{where} sent nothing for {self.read_timeout} s (read_timeout); the model "
                "may still be loading or be too slow for this device: raise read_timeout "
                "or lower max_tokens")
        if isinstance(exc, SSLError):
            return BackendUnavailableError(
                f"TLS with {where} failed ({exc}); give the server a certificate this "
                "device trusts (verification stays on)", retryable=False)
        return LLMError(f"{where} broke the connection ({exc}); it may have crashed or "
                        "restarted: try again")


class JsonCalls:
    """One JSON request/answer for an adapter with ``self._http`` (an HttpClient) and its
    own error mapping, ``_status_error(exc, model)`` and ``_stream_error(data, model)``."""

    async def _get(self, path):
        try:
            return await self._http.request_json("GET", path)
        except HttpStatusError as exc:
            raise self._status_error(exc, None) from None

    async def _post(self, path, body, model):
        try:
            data = await self._http.request_json("POST", path, body)
        except HttpStatusError as exc:
            raise self._status_error(exc, model) from None
        if "error" in data:
            raise self._stream_error(data, model)
        return data


def _encode(payload):
    return None if payload is None else json.dumps(payload).encode("utf-8")


def _detail(exc):
    # urllib3 prefixes the OS error with the connection's repr; keep the useful tail.
    return str(exc).split("new connection: ")[-1]


def _chunks(response):
    """Yield body bytes as they arrive, without waiting for a full buffer."""
    if response.chunked and response.supports_chunked_reads():
        return response.read_chunked(decode_content=True)
    if hasattr(response, "read1"):  # urllib3 >= 2.3
        return iter(lambda: response.read1(65536), b"")
    return response.stream(1)


def _line_batches(chunks, where):
    """Split a byte stream into lines; yield the complete lines of each chunk as a list."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        if b"\n" in chunk:
            *lines, pending = pending.split(b"\n")
            yield lines
        if len(pending) > MAX_LINE_BYTES:
            raise LLMError(f"{where} sent a line longer than {MAX_LINE_BYTES} bytes; "
                           "check that the URL points at the right server")
    if pending.strip():
        yield [pending]
