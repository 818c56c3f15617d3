#!/usr/bin/env python3
"""A loopback TCP proxy that breaks the link on purpose (reliability.md Appendix A).

It sits between fm-edge and the cloud and injects the faults a cellular link produces,
at layer 4 so it works the same for HTTP and HTTPS:

- ``latency_ms=N``          delay every forwarded chunk (up to 16 KB) by N ms, both ways;
- ``cut_after=BYTES``       pass that many response bytes, then close (a truncated body);
- ``cut_request_after=B``   pass that many request bytes upstream, then kill both sides;
- ``blackhole=1``           accept, swallow, never answer (a silent partition: timeouts);
- ``reset_p=P``             reset a new connection with probability P (0..1);
- ``drop_response=1``       forward the request in full, then kill the connection as soon
                            as the upstream answers: the cloud committed, the ack is lost;
- ``link_down=1``           reset every open connection and every new one until link up.

Command line (``kill -USR1 PID`` toggles the link down/up)::

    python3 tools/chaosproxy.py LISTEN_PORT UP_HOST UP_PORT [latency_ms=N] [cut_after=BYTES]
        [cut_request_after=BYTES] [blackhole=1] [reset_p=0.1] [drop_response=1] [link_down=1]

From tests::

    proxy = ChaosProxy("127.0.0.1", studio_port).start()     # listens on an ephemeral port
    proxy.set(cut_after=500)      # faults apply to connections opened from now on
    proxy.link_down()             # ... except the link, which also kills open connections
    proxy.stop()

Stdlib only; Python 3.9 compatible.
"""

import asyncio
import random
import signal
import socket
import struct
import sys
import threading

CHUNK = 16384

DEFAULT_MODE = {
    "latency_ms": 0.0,
    "cut_after": None,
    "cut_request_after": None,
    "blackhole": False,
    "reset_p": 0.0,
    "drop_response": False,
    "link_down": False,
}


def _parse_mode_value(name, value):
    """Coerce one mode setting; raises ValueError naming the setting and the bad value."""
    if name not in DEFAULT_MODE:
        raise ValueError("unknown chaos setting %r: use one of %s"
                         % (name, ", ".join(sorted(DEFAULT_MODE))))
    try:
        if name in ("cut_after", "cut_request_after"):
            parsed = None if value is None else int(value)
            if parsed is not None and parsed < 0:
                raise ValueError
            return parsed
        if name in ("latency_ms", "reset_p"):
            parsed = float(value)
            if parsed < 0 or (name == "reset_p" and parsed > 1):
                raise ValueError
            return parsed
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    except (TypeError, ValueError):
        raise ValueError("bad value %r for chaos setting %s" % (value, name))


def _kill(writer):
    """Close with a TCP reset (SO_LINGER 0): the peer sees ECONNRESET, not a clean EOF."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _close(writer):
    try:
        writer.close()
    except (OSError, RuntimeError):
        pass


class ChaosProxy:
    """The proxy, running its own asyncio loop in a background thread."""

    def __init__(self, upstream_host, upstream_port, listen_host="127.0.0.1", listen_port=0,
                 rng=None, **mode):
        self.upstream = (upstream_host, int(upstream_port))
        self.listen = (listen_host, int(listen_port))
        self.rng = rng or random.Random()
        self._mode = dict(DEFAULT_MODE)
        self._lock = threading.Lock()
        self.set(**mode)
        self.stats = {"connections": 0, "resets": 0, "bytes_up": 0, "bytes_down": 0,
                      "responses_dropped": 0, "cuts": 0}
        self._writers = set()      # every open socket (client and upstream sides)
        self._tasks = set()
        self._loop = None
        self._thread = None
        self._server = None
        self.port = None

    # -- control (any thread) ----------------------------------------------------------------

    def set(self, **mode):
        """Change fault settings; names as in the module docstring."""
        parsed = {name: _parse_mode_value(name, value) for name, value in mode.items()}
        with self._lock:
            self._mode.update(parsed)
        if parsed.get("link_down"):
            self._call(self._kill_all)
        return self

    def clear(self):
        """Back to a clean pass-through link."""
        with self._lock:
            self._mode = dict(DEFAULT_MODE)
        return self

    def link_down(self):
        return self.set(link_down=True)

    def link_up(self):
        return self.set(link_down=False)

    @property
    def mode(self):
        with self._lock:
            return dict(self._mode)

    @property
    def url(self):
        return "http://%s:%d" % (self.listen[0], self.port)

    def start(self):
        ready = threading.Event()
        failure = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready, failure),
                                        name="chaosproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError("chaos proxy could not listen on %s:%d: %s"
                               % (self.listen + (failure[0] if failure else "timeout",)))
        return self

    def stop(self):
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- loop side ---------------------------------------------------------------------------

    def _call(self, func):
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(func)

    def _run(self, ready, failure):
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, self.listen[0], self.listen[1]))
        except OSError as exc:
            failure.append(str(exc))
            ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _shutdown(self):
        self._server.close()
        self._kill_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _kill_all(self):
        for writer in list(self._writers):
            _kill(writer)
        self._writers.clear()

    async def _handle(self, client_reader, client_writer):
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(client_writer)
        self.stats["connections"] += 1
        try:
            await self._serve_connection(client_reader, client_writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(client_writer)
            _close(client_writer)
            self._tasks.discard(task)

    async def _serve_connection(self, client_reader, client_writer):
        mode = self.mode
        if mode["link_down"] or self.rng.random() < mode["reset_p"]:
            self.stats["resets"] += 1
            _kill(client_writer)
            return
        if mode["blackhole"]:
            while await client_reader.read(CHUNK):   # swallow; never answer
                pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.stats["resets"] += 1     # upstream down: the client sees a reset, as it would
            _kill(client_writer)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(
                self._pipe(client_reader, up_writer, client_writer, mode, upward=True),
                self._pipe(up_reader, client_writer, up_writer, mode, upward=False))
        finally:
            self._writers.discard(up_writer)
            _close(up_writer)

    async def _pipe(self, reader, writer, other, mode, upward):
        """One direction of a proxied connection: client → upstream (``upward``, honouring
        latency and cut_request_after) or upstream → client (latency, cut_after and
        drop_response)."""
        sent, limit = 0, mode["cut_request_after" if upward else "cut_after"]
        counter = "bytes_up" if upward else "bytes_down"
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self._link_is_down(writer, other):
                    return
                if not upward and mode["drop_response"]:
                    # The upstream answered, so it has read and handled the whole request.
                    self.stats["responses_dropped"] += 1
                    _kill(writer)
                    _kill(other)
                    return
                await self._delay(mode)
                if limit is not None and sent + len(data) > limit:
                    writer.write(data[:limit - sent])
                    await writer.drain()
                    self.stats["cuts"] += 1
                    if upward:
                        _kill(writer)   # the upstream sees the request reset, incomplete
                    # A response ends with a clean close after the partial bytes: a reset
                    # could make the kernel discard data the client has not read yet,
                    # hiding the truncation.
                    _kill(other)
                    return
                sent += len(data)
                self.stats[counter] += len(data)   # counted before the peer can see it
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            _close(writer)

    def _link_is_down(self, writer, other):
        """Checked per chunk too, so no byte crosses a link that went down mid-transfer."""
        if not self.mode["link_down"]:
            return False
        _kill(writer)
        _kill(other)
        return True

    @staticmethod
    async def _delay(mode):
        if mode["latency_ms"]:
            await asyncio.sleep(mode["latency_ms"] / 1000.0)


def _parse_args(argv):
    if len(argv) < 3:
        raise ValueError("usage: chaosproxy.py LISTEN_PORT UP_HOST UP_PORT [name=value ...]")
    mode = {}
    for item in argv[3:]:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError("expected name=value, got %r" % item)
        mode[name] = value
    return int(argv[0]), argv[1], int(argv[2]), mode


def main(argv=None):
    try:
        listen_port, up_host, up_port, mode = _parse_args(sys.argv[1:] if argv is None else argv)
        proxy = ChaosProxy(up_host, up_port, listen_port=listen_port, **mode).start()
    except (ValueError, RuntimeError) as exc:
        print("chaosproxy: %s" % exc, file=sys.stderr)
        return 2
    print("chaosproxy listening on 127.0.0.1:%d -> %s:%d %s"
          % (proxy.port, up_host, up_port, proxy.mode), flush=True)
    stopped = threading.Event()

    def toggle(*_):
        proxy.set(link_down=not proxy.mode["link_down"])
        print("chaosproxy: link %s" % ("down" if proxy.mode["link_down"] else "up"), flush=True)

    signal.signal(signal.SIGUSR1, toggle)
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
