"""The local HTTP API (design §9): run pipelines, read results, health, sync, metrics.

Endpoints (all JSON but /metrics; errors are ``{"error": {"code", "message", "retryable"}}``):

    POST /run/{pipeline_id}   inputs in the body; ?wait=true (or Prefer: wait) -> 200 result,
                              else 202 {run_id, status} + Location; Idempotency-Key honoured
    GET  /status/{run_id}     the stored result
    GET  /runs                ?status=&pipeline=&sync_state=&limit=
    GET  /pipelines           cached pipelines
    GET  /health              liveness + readiness (no token needed; details only with one)
    POST /sync                one sync pass now (runtime.sync_now)
    GET  /metrics             Prometheus text format 0.0.4
    GET  /openapi.json        the OpenAPI 3.0 description of all of this

No business logic lives here: every endpoint calls the runtime and store methods the CLI
calls. Threads, and why:

* the *lobby* (one thread, a selector) accepts connections and holds each until a whole
  request head has arrived, so idle and slow clients cost a file descriptor, never a
  thread (500 idle connections must not stop /health);
* *workers* (``ServerLimits.max_workers``) parse, check and answer; a keep-alive
  connection whose next request does not follow within 2 ms goes back to the lobby. A
  worker starts each run itself (``run.drive``): a pipeline whose stages never wait runs
  to its end right there, sparing a hand-off to the loop and back, which under load
  costs more than such a run;
* the *runtime loop*: the runtime's asyncio event loop in its own thread, where every
  run that waits (a stage, a slot) carries on; the executor's slots are thread-safe, so
  its concurrency limits hold for everyone;
* the result store's *writer* commits records in groups and answers a waiting request
  itself (``on_recorded``), with the stored JSON as the reply.

Security (reliability.md §3) lives in ``server_security``: bind, token, Host/Origin,
limits. Idempotency keys live in memory: a repeated key returns the same run for as long
as this process runs (the last 10,000 keys), not across restarts.
"""

import asyncio
import collections
import concurrent.futures
import email.utils
import errno
import hashlib
import http
import inspect
import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError, FmEdgeError, NotFoundError, OfflineError
from .ids import new_run_id, validate_id
from .pipeline.run import drive
from .request_head import head_end, parse_head
from .server_security import (HttpError, ServerLimits, check_bind, check_host,
                              check_idempotency_key, check_origin, check_query_credentials,
                              check_token, is_loopback_host)

log = logging.getLogger("fmedge.server")

# Seconds a shutdown waits for running runs before cancelling them. Docker's `stop` kills
# after 10 s and systemd after 90 s: 8 s lets the cancelled runs be recorded in time.
SHUTDOWN_GRACE_S = 8.0
# After cancelling: how long the cancelled runs get to write their final record.
CANCEL_WAIT_S = 5.0
# How long POST /run (without wait) waits for the run's first durable record before it
# answers 202 "queued" (the run waits for a slot behind max_concurrent others).
# How long a 202 waits for the run's first durable record (the executor writes `pending`
# or `running` as soon as it admits the run; this bounds a pathologically slow disk).
ADMIT_WAIT_S = 30.0
# ?wait=true waits for the run's own time limit plus this allowance for queueing.
WAIT_ALLOWANCE_S = 60.0
RETRY_AFTER_S = 1
IDEMPOTENCY_KEYS_KEPT = 10000
HEALTH_CACHE_S = 1.0
STARTUP_TIMEOUT_S = 60.0
# A worker waits this long on a keep-alive connection for the next request before it
# hands the connection back to the lobby (see EdgeServer._next_request_soon).
KEEP_ALIVE_POLL_S = 0.002
_SWEEP_EVERY_S = 0.25
_LINGER_S = 2.0            # reading what a refused client still sends, so it sees the answer
_LINGER_MAX_BYTES = 4 * 1024 * 1024
_ACCEPT_BATCH = 64
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FINISHED = ("completed", "failed", "cancelled", "timeout", "interrupted")


# == the HTTP transport ===================================================================

class _Connection:
    """A client socket, the bytes read from it but not yet parsed, and its deadline."""

    __slots__ = ("sock", "address", "buffer", "deadline", "receiving", "lingering",
                 "queued_at")

    def __init__(self, sock, address, idle_timeout):
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.deadline = time.monotonic() + idle_timeout
        self.receiving = False      # part of a request head arrived
        self.lingering = False      # answered and closing: what arrives is discarded
        self.queued_at = 0.0

    def head_complete(self):
        return head_end(self.buffer) >= 0


class _ConnectionReader:
    """What the handler reads a body from: the buffer first, then the socket, never past
    ``deadline`` (a socket timeout alone is per recv: a client sending one byte every 9 s
    would never hit a 10 s one)."""

    def __init__(self, conn, timeout_s):
        self.conn = conn
        self.deadline = time.monotonic() + timeout_s

    def read(self, size):
        while len(self.conn.buffer) < size and self._fill():
            pass
        return self._take(min(size, len(self.conn.buffer)))

    def _take(self, count):
        data = bytes(self.conn.buffer[:count])
        del self.conn.buffer[:count]
        return data

    def _fill(self):
        data = _recv_by(self.conn.sock, self.deadline)
        if not data:
            return False
        self.conn.buffer += data
        return True


class _ConnectionWriter:
    """``wfile`` for the handler: one sendall per response, bounded in time (a client that
    never reads cannot pin the thread)."""

    def __init__(self, conn, timeout_s):
        self.conn = conn
        self.timeout_s = timeout_s

    def write(self, data):
        _send_by(self.conn.sock, data, time.monotonic() + self.timeout_s)
        return len(data)

    def flush(self):
        return None


# Client sockets stay non-blocking for their whole life (the lobby needs that). A Python
# socket timeout would poll() before every recv/send: two GIL hand-offs per call instead
# of one, which costs a third of the throughput under load. So I/O is tried at once and
# poll() waits only when the kernel says EAGAIN.

def _wait_for(sock, events, timeout_s):
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(max(0.0, timeout_s) * 1000.0))


def _recv_by(sock, deadline):
    """Up to 64 KiB from ``sock`` (b"" at EOF); socket.timeout past ``deadline``."""
    while True:
        try:
            return sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _wait_for(sock, select.POLLIN, remaining):
            raise socket.timeout("timed out")


def _send_by(sock, data, deadline):
    """All of ``data``, or socket.timeout past ``deadline`` (a client that never reads)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            pass
        if view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_for(sock, select.POLLOUT, remaining):
                raise socket.timeout("timed out")


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a fixed number of worker threads and a selector in front.

    ``serve_forever`` is the lobby loop (run it in a thread); ``process_request`` queues a
    connection whose request head is complete for the workers; ``handle_connection`` (given
    by the owner) answers it and says whether to keep it open. Beyond ``max_connections``
    a new connection gets 503 and is closed; a request that waited ``queue_timeout_s`` for
    a worker gets 503 too.
    """

    request_queue_size = 1024          # listen backlog (the kernel caps it at somaxconn)
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, limits, handle_connection, counters):
        host = address[0].strip("[]")
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.limits = limits
        self.handle_connection = handle_connection
        self.counters = counters
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._returned = collections.deque()   # connections handed back by workers
        self._ready = queue.SimpleQueue()      # connections waiting for a worker
        self._open = 0
        self._open_lock = threading.Lock()
        self._stop = threading.Event()
        self._listener_paused = False
        self._loop_done = threading.Event()
        self._workers = []
        super().__init__((host, address[1]), BaseHTTPRequestHandler)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can take
        # seconds on a device without DNS; the name is not needed.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    # -- threads ----------------------------------------------------------------------------

    def start_workers(self):
        for number in range(self.limits.max_workers):
            worker = threading.Thread(target=self._work, name=f"fmedge-http-{number}",
                                      daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop_workers(self, timeout_s):
        for _ in self._workers:
            self._ready.put(None)
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _work(self):
        while True:
            conn = self._ready.get()
            if conn is None:
                return
            self._serve_one(conn)

    def _serve_one(self, conn):
        if time.monotonic() - conn.queued_at > self.limits.queue_timeout_s:
            self.counters.count_connection("queue_timeout")
            self.refuse(conn, _overload_response("waited too long for a free worker"))
            return
        try:
            outcome = self.handle_connection(conn)
        except Exception:   # a bug must cost one connection, never a worker thread
            log.exception("unexpected error while answering %s", conn.address[0])
            outcome = "close"
        if outcome == "keep":
            self.give_back(conn)
        elif outcome == "linger":
            self.linger(conn)
        else:
            self.release(conn)

    @property
    def waiting(self):
        return self._ready.qsize()

    @property
    def open_connections(self):
        return self._open

    # -- the lobby ----------------------------------------------------------------------------

    def serve_forever(self, poll_interval=_SWEEP_EVERY_S):
        """Accept and watch connections until ``shutdown``; runs in the lobby thread."""
        self.socket.setblocking(False)
        self.selector.register(self.socket, selectors.EVENT_READ, "listener")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in self.selector.select(poll_interval):
                    self._on_event(key)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + poll_interval
        finally:
            self._close_lobby()
            self._loop_done.set()

    def _on_event(self, key):
        if key.data == "listener":
            self._accept()
        elif key.data == "wake":
            self._take_returned()
        else:
            self._receive(key.data)

    def shutdown(self):
        """Stop accepting and close every connection the lobby holds (idle ones)."""
        self._stop.set()
        self._wake()
        self._loop_done.wait(5.0)

    def process_request(self, conn, client_address=None):
        conn.queued_at = time.monotonic()
        self._ready.put(conn)

    def _accept(self):
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._admit(sock, address)

    def _accept_failed(self, exc):
        # Out of file descriptors: stop watching the listener until the next sweep, or
        # the always-readable listener would spin this thread.
        log.warning("cannot accept a connection: %s", exc)
        self.counters.count_connection("accept_failed")
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.selector.unregister(self.socket)
            self._listener_paused = True

    def _admit(self, sock, address):
        sock.setblocking(False)
        conn = _Connection(sock, address, self.limits.idle_timeout_s)
        with self._open_lock:
            self._open += 1
            opened = self._open
        limit = self.limits.max_connections
        if opened > limit:
            self.counters.count_connection("too_many_connections")
            response = _overload_response("too many open connections")
            if opened > limit + limit // 4 + 16:
                # Past the headroom even lingering costs too many descriptors: just close.
                _send_quietly(sock, response)
                self.release(conn)
            else:
                self._refuse_now(conn, response)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def _receive(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._forget(conn)
            return
        if conn.lingering:
            conn.buffer += data
            if len(conn.buffer) > _LINGER_MAX_BYTES:
                self._forget(conn)
            else:
                del conn.buffer[:]
            return
        self._received(conn, data)

    def _received(self, conn, data):
        conn.buffer += data
        if not conn.receiving:
            conn.receiving = True
            conn.deadline = time.monotonic() + self.limits.head_timeout_s
        if conn.head_complete():
            self.selector.unregister(conn.sock)
            self.process_request(conn)
        elif len(conn.buffer) > self.limits.max_head_bytes:
            self.selector.unregister(conn.sock)
            self.counters.count_connection("head_too_large")
            self._refuse_now(conn, _error_response(HttpError(
                431, "head_too_large", f"the request line and headers are over "
                f"{self.limits.max_head_bytes} bytes: send fewer or shorter headers",
                close=True)))

    def _sweep(self, now):
        if self._listener_paused:
            self._listener_paused = False
            self.selector.register(self.socket, selectors.EVENT_READ, "listener")
        expired = [key.data for key in list(self.selector.get_map().values())
                   if isinstance(key.data, _Connection) and key.data.deadline <= now]
        for conn in expired:
            self.selector.unregister(conn.sock)
            if conn.receiving and not conn.lingering:
                self.counters.count_connection("head_timeout")
                self._refuse_now(conn, _error_response(HttpError(
                    408, "request_timeout", "the request head did not arrive within "
                    f"{self.limits.head_timeout_s:g} s", close=True)))
            else:
                if not conn.lingering:
                    self.counters.count_connection("idle_timeout")
                self.release(conn)

    def _take_returned(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._returned:
            conn = self._returned.popleft()
            if conn.head_complete() and not conn.lingering:
                self.process_request(conn)
            else:
                self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, InterruptedError):
            pass    # a wake-up byte is already pending: that is enough
        except OSError:
            pass    # closed at shutdown

    def _close_lobby(self):
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, _Connection):
                self.selector.unregister(key.fileobj)
                self.release(key.data)
        while self._returned:
            self.release(self._returned.popleft())
        self.selector.close()
        # Closed now, not at server_close(): during the shutdown's grace a new client must
        # be refused at once, not left in the listen backlog until its own timeout.
        self.socket.close()

    # -- handing connections around ----------------------------------------------------------

    def give_back(self, conn):
        """A keep-alive connection waits in the lobby for its next request."""
        if self._stop.is_set():
            self.release(conn)
            return
        conn.receiving = bool(conn.buffer)
        timeout = self.limits.head_timeout_s if conn.receiving else self.limits.idle_timeout_s
        conn.deadline = time.monotonic() + timeout
        self._returned.append(conn)
        self._wake()

    def linger(self, conn):
        """Answered and closing: read (and drop) what the client still sends for a moment,
        so it sees our answer instead of a reset while it was still sending its body."""
        if not self._half_close(conn):
            return
        if self._stop.is_set():
            self.release(conn)
            return
        self._returned.append(conn)
        self._wake()

    def refuse(self, conn, response):
        """Send a short refusal from a worker, then linger-close."""
        try:
            _send_by(conn.sock, response, time.monotonic() + self.limits.io_timeout_s)
        except OSError:
            self.release(conn)
            return
        self.linger(conn)

    def _refuse_now(self, conn, response):
        """Refuse from the lobby without blocking it: the answer is small enough for the
        socket's send buffer; if it does not fit, the client gets a plain close."""
        try:
            conn.sock.send(response)
        except OSError:
            self.release(conn)
            return
        if self._half_close(conn):
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _half_close(self, conn):
        """Stop sending and start lingering; False (and the connection released) if the
        socket is gone already."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.release(conn)
            return False
        conn.lingering = True
        del conn.buffer[:]
        conn.deadline = time.monotonic() + _LINGER_S
        return True

    def _forget(self, conn):
        self.selector.unregister(conn.sock)
        self.release(conn)

    def release(self, conn):
        try:
            conn.sock.close()
        except OSError:
            pass
        with self._open_lock:
            self._open -= 1

    def server_close(self):
        super().server_close()
        for end in (self._wake_r, self._wake_w):
            end.close()


def _send_quietly(sock, data):
    try:
        sock.send(data)
    except OSError:
        pass


def _overload_response(reason):
    return _error_response(HttpError(503, "overloaded", f"the server is overloaded ({reason})"
                                     ": retry shortly", close=True))


def _error_response(error):
    return _error_reply(error).render(close=True)


# == replies ================================================================================

class Reply:
    """What an endpoint answers: status, body bytes, content type, extra headers."""

    __slots__ = ("status", "body", "content_type", "headers", "close")

    def __init__(self, status, payload=None, headers=None, body=None, content_type=JSON_TYPE,
                 close=False):
        self.status = status
        self.body = body if body is not None else _json_bytes(payload)
        self.content_type = content_type
        self.headers = dict(headers or {})
        self.close = close

    def render(self, close=False, http10_keep_alive=False):
        phrase = _PHRASES.get(self.status, "Status")
        lines = [f"HTTP/1.1 {self.status} {phrase}", "Server: fm-edge",
                 f"Date: {_http_date()}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}", "Cache-Control: no-store",
                 "X-Content-Type-Options: nosniff"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if close:
            lines.append("Connection: close")
        elif http10_keep_alive:
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_date_cache = [0, ""]


def _http_date():
    """The Date header, formatted once per second (formatdate costs as much as a route)."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
        _date_cache[0] = now
    return _date_cache[1]


def _json_bytes(payload):
    return json.dumps(payload, default=str, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def _error_reply(error, scrub=None):
    status = getattr(error, "http_status", 500)
    headers = dict(getattr(error, "headers", None) or {})
    if status in (429, 503) and "Retry-After" not in headers:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    message = scrub(str(error)) if scrub else str(error)
    body = {"error": {"code": error.code, "message": message,
                      "retryable": bool(error.retryable)}}
    return Reply(status, body, headers, close=getattr(error, "close", False))


# == one request ============================================================================

class _Request:
    """A parsed, checked request as the endpoints see it."""

    __slots__ = ("method", "path", "query", "headers", "body", "authorized")

    def __init__(self, method, path, query, headers):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.body = b""
        self.authorized = False


class _ApiHandler(BaseHTTPRequestHandler):
    """Parses one request (fmedge.request_head), applies the guards, calls the API.

    Driven by a worker, one request at a time (not by socketserver), so the connection
    can go back to the lobby between keep-alive requests.
    """

    protocol_version = "HTTP/1.1"
    server_version = "fm-edge"
    sys_version = ""

    def __init__(self, conn, server):   # noqa: super().__init__ would handle the socket
        self.conn = conn
        self.server = server
        self.client_address = conn.address
        self.request = self.connection = conn.sock
        self.rfile = _ConnectionReader(conn, server.limits.io_timeout_s)
        self.wfile = _ConnectionWriter(conn, server.limits.io_timeout_s)
        self.close_connection = True
        self.body_pending = False
        self.command = self.path = None
        self.request_version = self.default_request_version

    def handle_one_request(self):
        started = time.monotonic()
        buffer = self.conn.buffer
        end = head_end(buffer)
        if end < 0:           # the lobby hands over whole heads only; nothing to answer
            return "close"
        head = bytes(buffer[:end])
        del buffer[:end]
        if not self._parse(head):
            return "linger"
        reply = self._reply()
        self._send(reply)
        self.server.observe_request(self.command, self.path, reply.status, started)
        if self.close_connection:
            return "linger" if self.body_pending else "close"
        return "keep"

    def _parse(self, head):
        """BaseHTTPRequestHandler.parse_request's work, with fmedge.request_head's
        parser; False when the request was refused (answered already)."""
        try:
            self.command, self.path, self.request_version, self.headers = parse_head(
                head, self.server.limits.max_head_bytes)
        except HttpError as error:
            self.close_connection = True
            self.wfile.write(_error_reply(error).render(close=True))
            return False
        self.requestline = f"{self.command} {self.path} {self.request_version}"
        connection = (self.headers.get("Connection") or "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = connection == "close"
            if (self.headers.get("Expect") or "").lower() == "100-continue":
                return self.handle_expect_100()
        else:
            self.close_connection = connection != "keep-alive"
        return True

    def _reply(self):
        try:
            return self.server.api.answer(self)
        except socket.timeout:
            self.close_connection = True
            return _error_reply(HttpError(408, "request_timeout", "the request body did "
                                          f"not arrive within {self.server.limits.io_timeout_s:g}"
                                          " s", close=True))
        except ConnectionError:
            raise                 # the client went away mid-request: nobody to answer
        except FmEdgeError as error:
            return _error_reply(error, self.server.scrub)
        except Exception:
            log.exception("%s %s failed", self.command, urlsplit(self.path).path)
            return _error_reply(FmEdgeError("internal error while answering this request: "
                                            "the fm-edge log has the details",
                                            code="internal_error"))

    def _send(self, reply):
        # An unread body would be parsed as the next request: such a connection closes.
        if reply.close or self.server.stopping or self.body_pending:
            self.close_connection = True
        keep_10 = self.request_version == "HTTP/1.0" and not self.close_connection
        self.wfile.write(reply.render(self.close_connection, keep_10))

    def read_body(self, length):
        """``length`` bytes of body; raises socket.timeout past the I/O deadline."""
        self.rfile.deadline = time.monotonic() + self.server.limits.io_timeout_s
        body = self.rfile.read(length)
        self.body_pending = False
        if len(body) < length:
            raise HttpError(400, "incomplete_body", f"the body ended after {len(body)} of "
                            f"{length} bytes (Content-Length)", close=True)
        return body

    def handle_expect_100(self):
        # Refuse an oversized body before the client sends it (curl asks for big bodies).
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.limits.max_body_bytes:
            self.send_error(413, _too_large_message(int(length),
                                                    self.server.limits.max_body_bytes))
            return False
        return super().handle_expect_100()

    def send_error(self, code, message=None, explain=None):
        # The stdlib parser's refusals (400, 414, 431, 505...) in the API's JSON shape.
        self.close_connection = True
        try:
            phrase = http.HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        error = HttpError(code, phrase.lower().replace(" ", "_").replace("-", "_"),
                          message or phrase, close=True)
        self.wfile.write(_error_reply(error).render(close=True))

    def log_message(self, format, *args):   # noqa: A002 (the stdlib's signature)
        log.debug("%s: " + format, self.client_address[0], *args)


def _too_large_message(length, limit):
    return (f"the request body of {length} bytes is over the limit of {limit} bytes: send "
            "smaller inputs (large data belongs in a file the pipeline reads)")


# == the API ==============================================================================

class _Route:
    """One endpoint: its first path segment, its method, whether an id follows, and
    whether it answers without a token (only /health)."""

    __slots__ = ("name", "method", "takes_id", "public")

    def __init__(self, name, method, takes_id=False, public=False):
        self.name, self.method, self.takes_id, self.public = name, method, takes_id, public


_ROUTES = {route.name: route for route in (
    _Route("run", "POST", takes_id=True),
    _Route("status", "GET", takes_id=True),
    _Route("runs", "GET"),
    _Route("pipelines", "GET"),
    _Route("health", "GET", public=True),
    _Route("sync", "POST"),
    _Route("metrics", "GET"),
    _Route("openapi.json", "GET"),
)}


class _Api:
    """Routes a checked request to the runtime and turns the answer into a Reply."""

    def __init__(self, server):
        self.server = server
        self.runtime = server.runtime
        self.config = server.runtime.config
        self._health = _HealthCache(server)

    def answer(self, handler):
        request = self._checked(handler)
        route, args = self._route(request)
        self._authorize(request, route)
        request.body = self._body(handler, request)
        method = getattr(self, "do_" + route.name.replace(".", "_"))
        return method(request, *args)

    # -- guards, in order: Host/Origin, route, token, body ----------------------------------

    def _checked(self, handler):
        # One lower-cased dict: each email.message lookup scans every header again.
        headers = {name.lower(): value for name, value in handler.headers.items()}
        host = check_host(headers.get("host"), self.server.loopback)
        check_origin(headers.get("origin"), host, self.server.loopback)
        path, query = _split_target(handler.path)
        check_query_credentials(query)
        handler.body_pending = _declared_length(headers) > 0 or (
            "transfer-encoding" in headers)
        return _Request(handler.command, path, query, headers)

    def _route(self, request):
        segments = request.path.split("/")
        route = _ROUTES.get(segments[1]) if len(segments) > 1 and not segments[0] else None
        if route is None or len(segments) != (3 if route.takes_id else 2):
            raise NotFoundError(f"no endpoint {request.path!r}: see GET /openapi.json for "
                                "the API")
        if request.method != route.method:
            raise HttpError(405, "method_not_allowed",
                            f"{request.path} accepts {route.method}, not {request.method}",
                            headers={"Allow": route.method})
        return route, ((unquote(segments[2]),) if route.takes_id else ())

    def _authorize(self, request, route):
        token = self.config.api_token
        if route.public:
            try:
                check_token(request.headers.get("authorization"), token)
                request.authorized = True
            except HttpError:
                request.authorized = False
            return
        check_token(request.headers.get("authorization"), token)
        request.authorized = True

    def _body(self, handler, request):
        headers = request.headers
        if "transfer-encoding" in headers:
            if "content-length" in headers:
                raise HttpError(400, "bad_framing", "the request has both Transfer-Encoding "
                                "and Content-Length: send only Content-Length", close=True)
            raise HttpError(411, "length_required", "chunked request bodies are not "
                            "accepted: send the body with a Content-Length header",
                            close=True)
        length = _content_length(handler.headers) if "content-length" in headers else 0
        if length > self.server.limits.max_body_bytes:
            raise HttpError(413, "body_too_large", _too_large_message(
                length, self.server.limits.max_body_bytes), close=True)
        return handler.read_body(length) if length else b""

    # -- endpoints --------------------------------------------------------------------------

    def do_run(self, request, raw_id):
        pipeline_id = validate_id(raw_id, "pipeline")
        if self.server.stopping:
            raise HttpError(503, "shutting_down", "the server is shutting down and starts "
                            "no new runs: retry when it is back", headers={"Retry-After": "5"})
        inputs = _json_inputs(request)
        wait_s = _wait_seconds(request, self.config.execution_timeout)
        key = check_idempotency_key(request.headers.get("idempotency-key"))
        fingerprint = key and hashlib.sha256(
            pipeline_id.encode() + b"\0" + request.body).hexdigest()
        return self.server.runs.start(pipeline_id, inputs, wait_s, key, fingerprint)

    def do_status(self, request, raw_id):
        run_id = validate_id(raw_id, "run")
        record = self.runtime.results.get_now(run_id)
        if record is not None:
            return Reply(200, record)
        if self.server.runs.is_queued(run_id):
            return Reply(200, {"run_id": run_id, "status": "queued"})
        raise NotFoundError(f"run {run_id} is not on this device: it never ran here, or it "
                            "was synced and later removed (result_retention_days)")

    def do_runs(self, request):
        from .cache.results import STATUSES, SYNC_STATES

        query = request.query
        pipeline_id = query.get("pipeline")
        if pipeline_id is not None:
            validate_id(pipeline_id, "pipeline")
        runs = self.runtime.results.list_now(
            status=_choice(query, "status", STATUSES), pipeline_id=pipeline_id,
            sync_state=_choice(query, "sync_state", SYNC_STATES),
            limit=_int_param(query, "limit", 50, 1, 1000))
        return Reply(200, {"runs": runs, "count": len(runs)})

    def do_pipelines(self, request):
        pipelines = self.runtime.pipelines.list_now()
        return Reply(200, {"pipelines": pipelines, "count": len(pipelines)})

    def do_health(self, request):
        status, body = self._health.get(detailed=request.authorized)
        return Reply(status, body=body)

    def do_sync(self, request):
        return self.server.runs.sync()

    def do_metrics(self, request):
        return Reply(200, body=render_metrics(self.server).encode("utf-8"),
                     content_type=METRICS_TYPE)

    def do_openapi_json(self, request):
        return Reply(200, body=self.server.openapi_bytes())


def _declared_length(headers):
    value = headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else 0


def _content_length(message):
    """The one Content-Length of the request (repeated, differing ones are refused)."""
    values = message.get_all("Content-Length") or []
    if len(set(v.strip() for v in values)) > 1 or not values[0].strip().isdigit():
        raise HttpError(400, "bad_content_length", f"Content-Length {values[0]!r} is not "
                        "one non-negative integer", close=True)
    return int(values[0])


def _split_target(target):
    """(path, query dict) of a request target; most targets have no query to parse."""
    if "?" not in target and "#" not in target and not target.startswith(("http:", "https:")):
        return target, {}
    parts = urlsplit(target)
    return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def _json_inputs(request):
    """The run's inputs: the body as a JSON object ({} when the body is empty)."""
    body = request.body
    if not body.strip():
        return {}
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != JSON_TYPE and not media.endswith("+json"):
        # Browsers send text/plain and form bodies cross-origin without asking first;
        # insisting on JSON keeps a web page from starting runs (CSRF).
        raise HttpError(415, "unsupported_media_type",
                        f"the body's Content-Type is {media or 'missing'!r}: send the inputs "
                        "as JSON with `Content-Type: application/json`")
    try:
        inputs = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HttpError(400, "malformed_json", "the request body is not UTF-8 text: send "
                        "the inputs as a UTF-8 JSON object") from None
    except RecursionError:
        raise HttpError(400, "malformed_json", "the request body nests too deeply: "
                        "flatten the inputs") from None
    except ValueError as exc:
        raise HttpError(400, "malformed_json", f"the request body is not valid JSON ({exc}):"
                        " send the inputs as a JSON object, e.g. {\"x\": 1}") from None
    if inputs is None:
        return {}
    if not isinstance(inputs, dict):
        raise HttpError(400, "bad_inputs", "the inputs must be a JSON object, got a JSON "
                        f"{_json_kind(inputs)}: wrap them, e.g. {{\"values\": [1, 2]}}")
    return inputs


def _json_kind(value):
    return {list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


def _wait_seconds(request, execution_timeout):
    """How long POST /run waits for the result; None = answer 202 at once."""
    ceiling = execution_timeout + WAIT_ALLOWANCE_S
    raw = request.query.get("wait")
    if raw is not None:
        text = raw.strip().lower()
        if text in ("", "true", "1", "yes"):
            return ceiling
        if text in ("false", "0", "no"):
            return None
        raise HttpError(400, "bad_query", f"wait={raw!r}: use wait=true or wait=false")
    return _prefer_wait(request.headers.get("prefer"), ceiling)


def _prefer_wait(header, ceiling):
    """RFC 7240 ``Prefer: wait`` or ``wait=SECONDS``; preferences that do not parse are
    ignored, as the RFC allows."""
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value.strip().strip('"')) if value.strip() else ceiling
        except ValueError:
            return None
        return max(0.0, min(seconds, ceiling)) if seconds == seconds else None
    return None


def _choice(query, name, allowed):
    value = query.get(name)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise HttpError(400, "bad_query", f"{name}={value!r} is not one of "
                        + ", ".join(allowed))
    return value


def _int_param(query, name, default, low, high):
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise HttpError(400, "bad_query", f"{name}={raw!r}: use a whole number from {low} "
                        f"to {high}")
    return int(raw)


# == runs started through the API ===========================================================

class _Runs:
    """Submitting runs to the executor, waiting for them, idempotency keys, shutdown.

    A run answered 202 is *admitted*: its first durable record exists (it started), or it
    waits in the executor's queue ("queued": its record appears when it starts).
    """

    def __init__(self, server):
        self.server = server
        self.runtime = server.runtime
        # run_id -> _RunFuture. Single dict operations need no lock (the GIL makes them
        # atomic); every lock taken per request is a chance to wait behind other threads.
        self._inflight = {}
        self._keys = collections.OrderedDict()       # Idempotency-Key -> (fingerprint, run_id)
        self._keys_lock = threading.Lock()
        self._waiters_lock = threading.Lock()
        self._waiters = 0

    # -- starting -----------------------------------------------------------------------------

    def start(self, pipeline_id, inputs, wait_s, key, fingerprint):
        # Read here, not in the runtime loop: a database read gives up the GIL, and the
        # loop, which every run passes through, would wait behind every other thread to
        # get it back. (A replayed key reads it for nothing; that is rare.)
        document = self.runtime.pipelines.get_now(pipeline_id)
        if not key:
            run_id = new_run_id()
            future = self._register(run_id, key)
        else:
            with self._keys_lock:
                known = self._claimed(key, fingerprint)
                if known is None:
                    # Remembered and registered under the lock: the same key sent twice
                    # at once must find the first run.
                    run_id = new_run_id()
                    self._remember(key, fingerprint, run_id)
                    future = self._register(run_id, key)
            if known is not None:
                reply = self._replay(known, wait_s)
                reply.headers["Idempotent-Replayed"] = "true"
                return reply
        self._submit(future, pipeline_id, document, inputs, run_id)
        return self._answer(run_id, future, wait_s)

    def _claimed(self, key, fingerprint):
        entry = self._keys.get(key)
        if entry is None:
            return None
        if entry[0] != fingerprint:
            raise HttpError(422, "idempotency_key_reused",
                            f"Idempotency-Key {key!r} was used for a different request "
                            "(another pipeline or other inputs): use a new key per run")
        self._keys.move_to_end(key)
        return entry[1]

    def _remember(self, key, fingerprint, run_id):
        self._keys[key] = (fingerprint, run_id)
        while len(self._keys) > IDEMPOTENCY_KEYS_KEPT:
            self._keys.popitem(last=False)

    def _register(self, run_id, key):
        future = self._inflight[run_id] = _RunFuture(
            lambda done: self._finished(run_id, key, done))
        return future

    def _submit(self, future, pipeline_id, document, inputs, run_id):
        loop = self.server.loop.loop
        if loop.is_closed():   # the server is stopping
            future.settle(error=HttpError(503, "shutting_down", "the server is shutting "
                                          "down and starts no new runs: retry when it is "
                                          "back"))
            return
        _begin_run(self.runtime.executor, loop, future, pipeline_id, document, inputs,
                   run_id)

    def _finished(self, run_id, key, future):
        """Called once, in whichever thread settled the run's future."""
        self._inflight.pop(run_id, None)
        if future.refused:
            if key:
                with self._keys_lock:
                    if self._keys.get(key, (None, None))[1] == run_id:
                        del self._keys[key]    # it never ran: the key may be used again
            return
        result = future.outcome[0]
        self.server.counters.run_finished(result.status, result.duration_ms / 1000.0)

    # -- answering ----------------------------------------------------------------------------

    def _answer(self, run_id, future, wait_s):
        if wait_s is not None and self._take_waiter():
            try:
                outcome = future.result(wait_s)
            finally:
                self._release_waiter()
            if outcome is not None:
                result, payload = outcome
                # The stored record's JSON is the answer: no second encoding.
                return Reply(200, body=payload.encode("utf-8")) if payload is not None \
                    else Reply(200, result.to_dict())
        status = self._admission(run_id, future)
        return _accepted(run_id, status)

    def _admission(self, run_id, future):
        """The run's status once it is recorded, finished or queued; raises if refused."""
        deadline = time.monotonic() + ADMIT_WAIT_S
        delay = 0.002
        while True:
            outcome = future.result(delay)
            if outcome is not None:
                return outcome[0].status
            record = self.runtime.results.get_now(run_id)
            if record is not None:
                # A run's first record is committed without its own fsync (nobody knew of
                # the run): make it durable before saying "accepted".
                self.runtime.results.flush_now()
                return record.get("status") or "running"
            if time.monotonic() >= deadline:
                # Never acknowledge what is not on disk: a crash now would lose it.
                raise OfflineError(f"run {run_id} was admitted but its record is not on disk "
                                   f"after {ADMIT_WAIT_S:.0f} s (the storage is very slow); "
                                   f"check GET /status/{run_id} before retrying")
            delay = min(delay * 2, 0.1)

    def _replay(self, run_id, wait_s):
        future = self._inflight.get(run_id)
        if future is not None:
            return self._answer(run_id, future, wait_s)
        record = self.runtime.results.get_now(run_id)
        if record is None:
            raise NotFoundError(f"run {run_id} of this Idempotency-Key is no longer on this "
                                "device (removed by retention): use a new key to run again")
        if record.get("status") in _FINISHED:
            return Reply(200, record)
        self.runtime.results.flush_now()
        return _accepted(run_id, record.get("status") or "running")

    def _take_waiter(self):
        with self._waiters_lock:
            if self._waiters >= self.server.limits.max_waiting_workers:
                return False
            self._waiters += 1
            return True

    def _release_waiter(self):
        with self._waiters_lock:
            self._waiters -= 1

    def is_queued(self, run_id):
        return run_id in self._inflight

    # -- sync ---------------------------------------------------------------------------------

    def sync(self):
        sync_now = getattr(self.runtime, "sync_now", None)
        if sync_now is None:
            raise HttpError(503, "sync_unavailable",
                            "sync is not available: no cloud_url configured")
        if not self._take_waiter():
            raise HttpError(503, "overloaded", "too many requests are waiting: retry "
                            "the sync shortly")
        try:
            outcome = sync_now()
            if inspect.isawaitable(outcome):
                outcome = self.server.loop.call(outcome)
        finally:
            self._release_waiter()
        return _sync_reply(outcome.to_dict() if hasattr(outcome, "to_dict") else outcome)

    # -- shutdown -----------------------------------------------------------------------------

    def drain(self, grace_s):
        """Wait up to ``grace_s`` for the runs; cancel the rest and let them record it."""
        pending = dict(self._inflight)
        if not pending:
            return
        log.info("shutdown: waiting up to %g s for %d runs", grace_s, len(pending))
        _wait_all(pending.values(), grace_s)
        left = {run_id: f for run_id, f in pending.items() if not f.done()}
        if not left:
            return
        log.warning("shutdown: cancelling %d runs still running after %g s",
                    len(left), grace_s)
        for run_id, future in left.items():
            self._cancel(run_id, future)
        _wait_all(left.values(), CANCEL_WAIT_S)
        never_started = sorted(r for r, f in left.items() if f.cancelled())
        if never_started:
            log.warning("shutdown: %d queued runs were cancelled before they started and "
                        "have no record: %s", len(never_started), ", ".join(never_started))

    def _cancel(self, run_id, future):
        try:
            running = self.server.loop.call(self.runtime.executor.cancel(run_id), 2.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            running = False
        if not running:
            future.cancel()      # still queued: it never starts


# A sync report's error_code as an HTTP status. A cloud that refuses the api_key is 502,
# not 401: the caller's own token was fine; the device's key for the cloud is not.
_SYNC_STATUS = {"not_configured": 503, "offline": 503, "busy": 429, "auth_failed": 502}


def _sync_reply(report):
    """200 with the report when the pass worked; else the API's error shape, the report
    beside it (what was uploaded before the failure, the counters)."""
    if not isinstance(report, dict):
        report = {"ok": True, "result": report}
    if report.get("ok", True):
        return Reply(200, report)
    code = report.get("error_code") or report.get("outcome") or "sync_failed"
    status = _SYNC_STATUS.get(code, 502)
    retryable = status in (429, 503) and code != "not_configured"
    message = report.get("message") or report.get("error") or "the sync pass failed"
    headers = {"Retry-After": str(int(report.get("retry_after") or RETRY_AFTER_S))} \
        if retryable else {}
    body = {"error": {"code": code, "message": message, "retryable": retryable},
            "report": report}
    return Reply(status, body, headers)


def _accepted(run_id, status):
    return Reply(202, {"run_id": run_id, "status": status},
                 headers={"Location": f"/status/{run_id}"})


class _RunFuture:
    """A run started through the API: settled with (result, its record's JSON text or
    None) once the final record is durable, or with the error that refused the run, or
    cancelled (shutdown; its task too, if it waits for a slot).

    Lighter than a concurrent.futures.Future, whose waiter takes a condition, a lock of
    its own and the condition again: under load each lock taken is a wait behind the
    other threads. Here a waiter blocks on one lock, released when the run is settled.
    """

    __slots__ = ("outcome", "error", "refused", "loop", "task", "_latch", "_settled",
                 "_on_done")

    def __init__(self, on_done=None):
        self.outcome = self.error = self.loop = self.task = None
        self.refused = False        # cancelled or refused: the run never ran
        self._latch = threading.Lock()
        self._latch.acquire()       # released once settled
        self._settled = threading.Lock()   # taken by whoever settles it first
        self._on_done = on_done

    def done(self):
        return self._settled.locked() and not self._latch.locked()

    def cancelled(self):
        return self.done() and self.refused and self.error is None

    def wait(self, timeout_s):
        """True once settled, False if still not after ``timeout_s``."""
        if not self._latch.acquire(timeout=max(0.0, timeout_s)):
            return False
        self._latch.release()       # let every other waiter through too
        return True

    def result(self, timeout_s):
        """(result, record JSON); raises the refusal; None if not settled in time."""
        if not self.wait(timeout_s):
            return None
        if self.error is not None:
            raise self.error
        if self.refused:
            raise HttpError(503, "shutting_down", "the run was cancelled before it "
                            "started: the server is shutting down; retry when it is back")
        return self.outcome

    def settle(self, outcome=None, error=None):
        """Resolve from whichever thread knows the outcome first (once; later calls, as
        a record written after a cancellation, change nothing)."""
        self._finish(outcome, error, refused=error is not None)

    def cancel(self):
        if not self._finish(None, None, refused=True):
            return False
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._cancel_task)
            except RuntimeError:     # the loop is closed: its tasks are gone
                pass
        return True

    def _finish(self, outcome, error, refused):
        if not self._settled.acquire(blocking=False):
            return False
        self.outcome, self.error, self.refused = outcome, error, refused
        self._latch.release()
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:      # bookkeeping must not hide the outcome
                log.exception("recording the end of a run failed")
        return True

    def _cancel_task(self):
        if self.task is not None:
            self.task.cancel()


def _wait_all(futures, timeout_s):
    deadline = time.monotonic() + timeout_s
    for future in futures:
        future.wait(deadline - time.monotonic())


def _begin_run(executor, loop, future, pipeline_id, document, inputs, run_id):
    """In the HTTP worker: start the run here. One whose stages never wait runs to its
    end in this thread, with no hand-off to the runtime loop and back; the store's
    writer thread settles ``future`` once its record is durable. Anything that waits (a
    slot, a stage) carries on in the loop (see ``EdgeExecutor.execute``)."""
    coroutine = executor.execute(
        pipeline_id=pipeline_id, document=document, inputs=inputs, run_id=run_id,
        on_recorded=lambda result, payload: future.settle((result, payload)))
    try:
        drive(coroutine, loop, lambda task: _adopt(future, task))
    except Exception as error:            # refused: unknown pipeline, busy, bad inputs
        future.settle(error=error)


def _adopt(future, task):
    """In the runtime loop: the run carries on as ``task``."""
    future.loop, future.task = task.get_loop(), task
    task.add_done_callback(lambda done: _run_task_done(future, done))
    if future.cancelled():
        task.cancel()


def _run_task_done(future, task):
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.settle(error=task.exception())
    # else: the record's writer settles it (on_recorded)


# == health and metrics =====================================================================

class _HealthCache:
    """/health must stay fast under load: the checks run at most once a second."""

    def __init__(self, server):
        self.server = server
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._answers = {}

    def get(self, detailed):
        """(status, JSON bytes): the detailed or the minimal body."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= HEALTH_CACHE_S:
                self._answers = self._fresh()
                self._checked_at = now
            return self._answers[bool(detailed)]

    def _fresh(self):
        checks = health_checks(self.server)
        ready = checks["store"]["ok"]
        body = {"status": "ok" if ready else "unavailable", "ready": ready}
        status = 200 if ready else 503
        return {False: (status, _json_bytes(body)),
                True: (status, _json_bytes(dict(body, checks=checks)))}


def health_checks(server):
    """Readiness detail from local state only: no network call on a health request."""
    runtime, config = server.runtime, server.runtime.config
    executor = runtime.executor
    return {
        "store": _store_check(runtime),
        "llm": {"backend": config.llm_backend, "model": config.llm_model or None,
                "configured": bool(config.llm_model),
                "last_state": getattr(runtime, "llm_state", None) or "unknown"},
        "sync": _sync_state(runtime),
        "runs": {"running": executor.running, "queued": executor.queue_depth},
        "uptime_s": round(time.monotonic() - server.started_at, 1),
    }


def _store_check(runtime):
    try:
        runtime.results.get_now("health-check")   # one indexed read: the store answers
    except FmEdgeError as error:
        return {"ok": False, "error": error.code}
    return {"ok": True}


def _sync_state(runtime):
    """What the sync manager last knew (runtime.sync may be absent or None)."""
    sync = getattr(runtime, "sync", None)
    if sync is None:
        return {"configured": bool(runtime.config.cloud_url), "state": "disabled"}
    status = getattr(sync, "status", None)
    state = str(getattr(status, "value", status) or "unknown").lower()
    since = getattr(sync, "offline_since", None)
    from .pipeline.result import iso

    return {"configured": True, "state": state, "online": state in ("online", "syncing"),
            "offline_since": iso(since) if since else None}


class _Counters:
    """What the API itself counts: responses, connection refusals, runs and durations."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               120.0, 300.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.responses = collections.Counter()
        self.connections = collections.Counter()
        self.runs = collections.Counter()
        self.buckets = [0] * len(self.BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0

    def response(self, status):
        with self._lock:
            self.responses[str(status)] += 1

    def count_connection(self, reason):
        with self._lock:
            self.connections[reason] += 1

    def run_finished(self, status, seconds):
        with self._lock:
            self.runs[status] += 1
            self.duration_sum += seconds
            self.duration_count += 1
            for index, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    self.buckets[index] += 1

    def snapshot(self):
        with self._lock:
            return {"responses": dict(self.responses), "connections": dict(self.connections),
                    "runs": dict(self.runs), "buckets": list(self.buckets),
                    "sum": self.duration_sum, "count": self.duration_count}


class _Exposition:
    """Prometheus text format 0.0.4, one metric family at a time."""

    def __init__(self):
        self.lines = []

    def add(self, name, kind, help_text, samples):
        self.lines.append(f"# HELP fmedge_{name} {help_text}")
        self.lines.append(f"# TYPE fmedge_{name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"fmedge_{name}{suffix}{_labels(labels)} {_number(value)}")

    def text(self):
        return "\n".join(self.lines) + "\n"


def _labels(labels):
    if not labels:
        return ""
    inner = ",".join('{}="{}"'.format(k, str(v).replace("\\", "\\\\").replace(
        '"', '\\"').replace("\n", "\\n")) for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _number(value):
    if isinstance(value, float):
        return repr(value) if value == value else "NaN"
    return str(int(value))


def render_metrics(server):
    """Every figure /metrics exports, read from the runtime, the stores and the API."""
    out = _Exposition()
    _api_metrics(out, server)
    _executor_metrics(out, server.runtime.executor)
    _store_metrics(out, server.runtime.results.stats())
    _sync_metrics(out, server.runtime)
    _device_metrics(out, server.runtime.config)
    return out.text()


def _api_metrics(out, server):
    snap = server.counters.snapshot()
    out.add("http_responses_total", "counter", "HTTP responses sent, by status code.",
            [("", {"code": code}, n) for code, n in sorted(snap["responses"].items())])
    out.add("http_connections_refused_total", "counter",
            "Connections closed by the server's limits, by reason.",
            [("", {"reason": r}, n) for r, n in sorted(snap["connections"].items())])
    out.add("http_connections_open", "gauge", "Open client connections.",
            [("", {}, server.http.open_connections)])
    out.add("http_requests_waiting", "gauge", "Requests waiting for a free worker thread.",
            [("", {}, server.http.waiting)])
    out.add("runs_total", "counter", "Runs finished through the HTTP API, by status.",
            [("", {"status": s}, n) for s, n in sorted(snap["runs"].items())])
    cumulative = list(zip(_Counters.BUCKETS, snap["buckets"]))
    samples = [("_bucket", {"le": _number(float(b))}, n) for b, n in cumulative]
    samples += [("_bucket", {"le": "+Inf"}, snap["count"]), ("_sum", {}, float(snap["sum"])),
                ("_count", {}, snap["count"])]
    out.add("run_duration_seconds", "histogram",
            "Duration of runs finished through the HTTP API.", samples)


def _executor_metrics(out, executor):
    out.add("runs_running", "gauge", "Runs executing now.", [("", {}, executor.running)])
    out.add("runs_queued", "gauge", "Runs waiting for a slot (queue depth).",
            [("", {}, executor.queue_depth)])
    for name, value in sorted(executor.counters.items()):
        out.add(f"executor_{name}_total", "counter",
                f"Executor counter '{name}' since the process started.", [("", {}, value)])


def _store_metrics(out, stats):
    out.add("results", "gauge", "Results in the store, by sync state.",
            [("", {"sync_state": s}, stats.get(s, 0))
             for s in ("running", "pending", "synced", "quarantined")])
    out.add("results_pending", "gauge", "Finished results waiting to be synced.",
            [("", {}, stats.get("pending", 0))])
    out.add("result_store_bytes", "gauge", "Bytes the result store uses.",
            [("", {}, stats.get("bytes", 0))])
    out.add("result_store_max_bytes", "gauge", "The result store's cap in bytes.",
            [("", {}, stats.get("max_bytes", 0))])
    out.add("result_drops_total", "counter",
            "Results removed or refused by the store, by reason (ResultStore counters).",
            [("", {"reason": r}, n) for r, n in sorted(stats.get("counters", {}).items())])


def _sync_metrics(out, runtime):
    sync = getattr(runtime, "sync", None)
    if sync is None:
        return
    counters = getattr(sync, "counters", None)
    if hasattr(counters, "as_dict"):
        counters = counters.as_dict()
    if isinstance(counters, dict):
        out.add("sync_events_total", "counter", "Sync attempts and outcomes, by event.",
                [("", {"event": k}, v) for k, v in sorted(counters.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool)])
    state = _sync_state(runtime)
    out.add("sync_online", "gauge", "1 when the cloud was reachable at the last check.",
            [("", {}, 1 if state["online"] else 0)])
    since = getattr(sync, "offline_since", None)
    offline = max(0.0, time.time() - since) if since and not state["online"] else 0.0
    out.add("offline_seconds", "gauge", "Seconds since the cloud was last reachable.",
            [("", {}, float(offline))])


def _device_metrics(out, config):
    from .fsutil import free_bytes

    out.add("disk_free_bytes", "gauge", "Free bytes on the disk holding the data dir.",
            [("", {}, free_bytes(config.data_dir))])
    out.add("model_cache_bytes", "gauge", "Bytes of files in the model cache.",
            [("", {}, _tree_bytes(config.model_cache_dir))])


def _tree_bytes(root):
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


# == the runtime's event loop ===============================================================

class _LoopThread:
    """The runtime's asyncio event loop, running in its own thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fmedge-runtime-loop",
                                        daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Not shutdown_default_executor(): a blocking stage that ignores cancellation
            # (an HTTP call) would hold the shutdown until its own timeout. Its thread
            # finishes on its own; store writes in flight complete under the store's lock.
            self.loop.close()

    def submit(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine, timeout=None):
        return self.submit(coroutine).result(timeout)

    def stop(self, timeout_s=10.0):
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)


# == the server =============================================================================

class EdgeServer:
    """The HTTP API over one runtime: ``start()``, then ``serve_forever()`` or
    ``shutdown()``. While it serves, the server owns the runtime's lifecycle: ``start``
    starts the runtime (if needed) in the server's event loop and ``shutdown`` stops it.
    """

    def __init__(self, runtime, host=None, port=None, limits=None):
        config = runtime.config
        self.runtime = runtime
        self.host = config.host if host is None else host
        self.port = config.port if port is None else int(port)
        self.limits = limits or ServerLimits()
        check_bind(self.host, config.api_token)
        self.loopback = is_loopback_host(self.host)
        self.counters = _Counters()
        self.loop = _LoopThread()
        self.api = None
        self.runs = None
        self.http = None
        self.stopping = False
        self.started_at = time.monotonic()
        self._openapi = None
        self._lobby = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._stop_w.setblocking(False)
        self._state_lock = threading.Lock()
        self._shut_down = False
        self.address = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self):
        """Bind, start the runtime and the threads; returns the bound (host, port)."""
        self.http = self._bind()
        self.address = self.http.server_address[:2]
        self.loop.start()
        try:
            self.loop.call(self._start_runtime(), STARTUP_TIMEOUT_S)
        except BaseException:
            self.loop.stop()
            self.http.server_close()
            self.http = None      # nothing to shut down
            raise
        self.runs = _Runs(self)
        self.api = _Api(self)
        self.http.start_workers()
        self._lobby = threading.Thread(target=self.http.serve_forever,
                                       name="fmedge-http-lobby", daemon=True)
        self._lobby.start()
        self.started_at = time.monotonic()
        log.info("fm-edge API listening on %s (token %s)", self.url,
                 "required" if self.runtime.config.api_token else "not required: loopback")
        return self.address

    @property
    def url(self):
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def _bind(self):
        try:
            return BoundedHTTPServer((self.host, self.port), self.limits,
                                     self._handle_connection, self.counters)
        except OSError as exc:
            reason = ("it is in use (another fm-edge serve?)" if exc.errno == errno.EADDRINUSE
                      else exc.strerror or str(exc))
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {reason}; stop the "
                              "other process or choose another port (--port, or config set "
                              "port)") from None

    async def _start_runtime(self):
        runtime = self.runtime
        if not runtime.started:
            await runtime.start()
        # Opened here, in one thread: the runtime's lazy properties are not thread-safe.
        runtime.pipelines, runtime.results, runtime.executor  # noqa: B018

    def serve_forever(self):
        """Block until ``request_stop`` (a signal, or another thread) asks to stop."""
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        while not poller.poll():
            pass

    def request_stop(self):
        """Ask ``serve_forever`` to return; safe from a signal handler."""
        try:
            self._stop_w.send(b"x")
        except OSError:
            pass

    def shutdown(self, grace_s=SHUTDOWN_GRACE_S):
        """Stop accepting, wait up to ``grace_s`` for runs, cancel the rest, stop."""
        with self._state_lock:
            if self._shut_down or self.http is None:
                return
            self._shut_down = True
        self.stopping = True
        self.request_stop()
        self.http.shutdown()
        self.runs.drain(grace_s)
        self.http.stop_workers(self.limits.io_timeout_s)
        try:
            self.loop.call(self.runtime.stop(), STARTUP_TIMEOUT_S)
        except Exception:   # the runtime's own failure must not keep the process alive
            log.exception("stopping the runtime failed")
        self.loop.stop()
        self.http.server_close()
        for end in (self._stop_r, self._stop_w):
            end.close()
        log.info("fm-edge API stopped")

    # -- per connection (worker threads) ------------------------------------------------------

    def _handle_connection(self, conn):
        """Answer the requests whose heads are buffered; 'keep', 'linger' or 'close'."""
        while True:
            handler = _ApiHandler(conn, self)
            try:
                outcome = handler.handle_one_request()
            except OSError:       # reset, broken pipe, or a client that stopped reading
                return "close"
            if outcome != "keep":
                return outcome
            if not conn.head_complete():
                outcome = self._next_request_soon(conn)
                if outcome != "ready":
                    return outcome

    def _next_request_soon(self, conn):
        """'ready' when the next keep-alive request arrived within a moment, else 'keep'
        (back to the lobby) or 'close' (the client left).

        Under load the next request follows within microseconds: reading it here saves
        two thread hand-offs (to the lobby and back). Only when no request waits for a
        worker, and only briefly, so an idle client still goes back to the lobby.
        """
        if self.http.waiting:
            return "keep"
        try:
            if not _wait_for(conn.sock, select.POLLIN, KEEP_ALIVE_POLL_S):
                return "keep"
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return "keep"
        except OSError:
            return "close"
        if not data:
            return "close"
        conn.buffer += data
        return "ready" if conn.head_complete() else "keep"

    def observe_request(self, method, target, status, started):
        self.counters.response(status)
        if log.isEnabledFor(logging.DEBUG):
            # The path only: a query string could carry what must not reach a log.
            log.debug("%s %s -> %d (%.1f ms)", method, urlsplit(target or "").path, status,
                      (time.monotonic() - started) * 1000.0)

    def scrub(self, message):
        """Error messages name files relative to the data dir, not absolute paths."""
        return message.replace(self.runtime.config.data_dir, "DATA_DIR")

    def openapi_bytes(self):
        if self._openapi is None:
            from . import __version__
            from .openapi import openapi_document

            self._openapi = _json_bytes(openapi_document(__version__))
        return self._openapi


def serve(runtime, host=None, port=None, *, grace_s=SHUTDOWN_GRACE_S, limits=None,
          on_ready=None):
    """`fm-edge serve`: serve until SIGTERM/SIGINT, then shut down gracefully.

    A second signal during the shutdown exits at once (runs in flight stay ``running``
    on disk and become ``interrupted`` at the next start). ``on_ready(host, port)`` is
    called once the server listens. Returns 0.
    """
    server = EdgeServer(runtime, host, port, limits=limits)
    bound = server.start()
    previous = _install_signal_handlers(server)
    try:
        if on_ready is not None:
            on_ready(*bound)
        server.serve_forever()
    finally:
        server.shutdown(grace_s)
        _restore_signal_handlers(previous)
    return 0


def _install_signal_handlers(server):
    if threading.current_thread() is not threading.main_thread():
        return {}
    received = []

    def on_signal(signum, frame):
        if received:
            # No logging here: a handler must not take locks another thread may hold.
            os.write(2, b"fm-edge: second signal: exiting now without waiting for runs\n")
            os._exit(128 + signum)
        received.append(signum)
        server.request_stop()

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler)
