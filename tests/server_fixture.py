"""A real fm-edge API server on 127.0.0.1 (ephemeral port) for tests, and its helpers.

- ``running_server(tmp_path, limits=..., **config)``: context manager yielding a
  ``ServerHandle`` (``.server``, ``.runtime``, ``.client``, ``.port``); shuts down after;
- ``ApiClient``: one request per call over ``http.client`` (a fresh connection each time,
  a socket timeout on every call, so a hung server fails the test instead of hanging it);
- ``Gate``: a tiny HTTP server whose answers wait until the test opens the gate; a
  pipeline calling it (``gated_pipeline``) runs exactly as long as the test wants;
- ``wait_until``: poll with a deadline instead of sleeping (shared with the studio tests).
"""

import contextlib
import http.client
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from studio_fixture import wait_until  # noqa: F401  (re-exported for the server tests)

from fmedge.config import EdgeConfig
from fmedge.runtime import EdgeRuntime
from fmedge.server import EdgeServer
from fmedge.server_security import ServerLimits

TOKEN = "test-token-8d3f2a61c4e94b7f"
JSON_HEADERS = {"Content-Type": "application/json"}
SENSOR_INPUTS = {"sensor_data": [1, 2, 3]}


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    @property
    def error_code(self):
        return self.json()["error"]["code"]

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


class ApiClient:
    """Requests to the server under test; ``token`` is sent as a bearer token if set."""

    def __init__(self, host, port, token=None, timeout=15.0):
        self.host, self.port, self.token, self.timeout = host, port, token, timeout

    def request(self, method, path, body=None, headers=None, json_body=None):
        merged = {}
        if self.token:
            merged["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            merged.update(JSON_HEADERS)
        merged.update(headers or {})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=merged)
            answer = conn.getresponse()
            return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()},
                            answer.read())
        finally:
            conn.close()

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, json_body=None, **kwargs):
        return self.request("POST", path, json_body=json_body, **kwargs)

    def run(self, pipeline_id, inputs=None, wait=True, **kwargs):
        suffix = "?wait=true" if wait else ""
        return self.post(f"/run/{pipeline_id}{suffix}", json_body=inputs or {}, **kwargs)


class ServerHandle:
    def __init__(self, server, client):
        self.server = server
        self.runtime = server.runtime
        self.client = client
        self.host, self.port = server.address

    def client_with(self, token=None, timeout=15.0):
        return ApiClient(self.host, self.port, token=token, timeout=timeout)

    def raw(self, data, timeout=10.0):
        """Send raw bytes on a new connection; return everything the server answers."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return read_until_closed(sock)


def read_until_closed(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def make_runtime(tmp_path, **config):
    return EdgeRuntime(EdgeConfig(data_dir=str(tmp_path / "edge"), **config))


@contextlib.contextmanager
def running_server(tmp_path, limits=None, host="127.0.0.1", grace_s=5.0, **config):
    """An EdgeServer over a fresh runtime in ``tmp_path``; shut down on exit."""
    runtime = make_runtime(tmp_path, **config)
    server = EdgeServer(runtime, host=host, port=0, limits=limits or ServerLimits())
    server.start()
    bound_host = "127.0.0.1" if host in ("0.0.0.0", "") else server.address[0]
    client = ApiClient(bound_host, server.address[1], token=config.get("api_token"))
    handle = ServerHandle(server, client)
    handle.host = bound_host
    try:
        yield handle
    finally:
        server.shutdown(grace_s)


def three_stage_pipeline(pipeline_id="three-stage"):
    """Three chained json_transform stages (what the benchmark runs too)."""
    return {"id": pipeline_id, "version": "1.0.0", "stages": [
        {"id": "a", "type": "json_transform", "config": {"data": {"x": "{{input.x}}"}}},
        {"id": "b", "type": "json_transform", "depends_on": ["a"],
         "config": {"data": {"y": "{{upstream.a.result.x + 1}}"}}},
        {"id": "c", "type": "json_transform", "depends_on": ["b"],
         "config": {"data": {"z": "{{upstream.b.result.y * 2}}"}}},
    ]}


def gated_pipeline(gate_url, pipeline_id="gated"):
    """One http_request stage that returns when the gate opens."""
    return {"id": pipeline_id, "version": "1", "stages": [
        {"id": "call", "type": "http_request",
         "config": {"url": gate_url, "timeout": 60}}]}


class Gate:
    """An HTTP server whose answers wait until ``open()``: runs that call it stay running."""

    def __init__(self):
        self.opened = threading.Event()
        self.arrived = 0
        self._lock = threading.Lock()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with gate._lock:
                    gate.arrived += 1
                gate.opened.wait(60)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.opened.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def open(self):
        self.opened.set()
