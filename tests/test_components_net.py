"""http_request, output_router, error_router and local_file against real servers and files.

HTTP tests talk to a stdlib http.server on 127.0.0.1 started here; nothing is mocked.
"""

import base64
import json
import os
import socket
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from fmedge.config import EdgeConfig
from fmedge.pipeline.components.base import ComponentError, MappingError
from fmedge.pipeline.components.net import MAX_RESPONSE_BYTES, allowed_roots
from tests.component_harness import call_component, make_context, run_context


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append({"method": self.command, "path": self.path,
                                 "headers": dict(self.headers), "body": body})
        return body

    def _send(self, status, body, content_type="application/json", extra=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self):
        body = self._record()
        parts = urlsplit(self.path)
        if parts.path == "/json":
            return self._send(200, {"ok": True, "query": parse_qs(parts.query)},
                              extra=[("X-Trace", "t-1")])
        if parts.path == "/echo":
            return self._send(201, {"method": self.command, "body": body.decode(),
                                    "content_type": self.headers.get("Content-Type")})
        if parts.path == "/text":
            return self._send(200, "h\u00e9llo".encode("latin-1"), "text/plain; charset=latin-1")
        if parts.path.startswith("/status/"):
            return self._send(int(parts.path.rsplit("/", 1)[1]), b"boom", "text/plain")
        if parts.path == "/redirect":
            return self._send(302, b"", "text/plain", [("Location", "/json?from=redirect")])
        if parts.path == "/slow":
            self.server.release.wait(30)
            return self._send(200, {"late": True})
        if parts.path == "/big":
            return self._send(200, b"x" * (MAX_RESPONSE_BYTES + 1), "text/plain")
        return self._send(404, {"error": "no route"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.seen = []
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    httpd.url = "http://127.0.0.1:{}".format(httpd.server_address[1])
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture
def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return "http://127.0.0.1:{}/x".format(port)


# -- http_request ---------------------------------------------------------------------------

def test_http_get_json_output_fields(server):
    out = call_component("http_request", {"url": server.url + "/json",
                                          "params": {"a": "1", "n": 2, "many": ["x", "y"]}})
    assert sorted(out) == ["body", "elapsed_ms", "headers", "status_code", "success", "url"]
    assert out["status_code"] == 200 and out["success"] is True
    assert out["body"] == {"ok": True, "query": {"a": ["1"], "n": ["2"], "many": ["x", "y"]}}
    assert out["headers"]["x-trace"] == "t-1"
    assert out["headers"]["content-type"] == "application/json"
    assert isinstance(out["elapsed_ms"], int) and out["elapsed_ms"] >= 0
    assert out["url"] == server.url + "/json?a=1&n=2&many=x&many=y"


def test_http_gallery_style_post_with_query_params_and_ms_timeout(server):
    # enterprise-data-pipeline / devops templates: query_params, timeout in ms, JSON body.
    out = call_component("http_request", {
        "url": server.url + "/echo?existing=1", "method": "post",
        "headers": {"Authorization": "Bearer token-1"},
        "query_params": {"limit": "100", "sort": "date:desc"},
        "body": {"repository": "r", "version": "v1"}, "timeout": 30000})
    assert out["status_code"] == 201 and out["success"] is True
    assert out["body"]["method"] == "POST"
    assert json.loads(out["body"]["body"]) == {"repository": "r", "version": "v1"}
    assert out["body"]["content_type"] == "application/json"
    seen = server.seen[-1]
    assert seen["path"] == "/echo?existing=1&limit=100&sort=date%3Adesc"
    assert seen["headers"]["Authorization"] == "Bearer token-1"


def test_http_text_body_redirect_head_and_4xx(server):
    text = call_component("http_request", {"url": server.url + "/text"})
    assert text["body"] == "h\u00e9llo"
    moved = call_component("http_request", {"url": server.url + "/redirect"})
    assert moved["status_code"] == 200
    assert moved["body"]["query"] == {"from": ["redirect"]}
    assert moved["url"] == server.url + "/json?from=redirect"
    stay = call_component("http_request", {"url": server.url + "/redirect",
                                           "follow_redirects": False})
    assert stay["status_code"] == 302 and stay["success"] is False
    head = call_component("http_request", {"url": server.url + "/json", "method": "HEAD"})
    assert head["status_code"] == 200 and head["body"] == ""
    missing = call_component("http_request", {"url": server.url + "/status/404"})
    assert missing["status_code"] == 404 and missing["success"] is False
    assert missing["body"] == "boom"


def test_http_string_body_and_json_alias(server):
    out = call_component("http_request", {"url": server.url + "/echo", "method": "PUT",
                                          "body": "plain text",
                                          "headers": {"Content-Type": "text/plain"}})
    assert out["body"] == {"method": "PUT", "body": "plain text", "content_type": "text/plain"}
    aliased = call_component("http_request", {"url": server.url + "/echo", "method": "PATCH",
                                              "json": [1, 2]})
    assert json.loads(aliased["body"]["body"]) == [1, 2]


def test_http_5xx_is_retryable_or_output(server):
    with pytest.raises(ComponentError) as caught:
        call_component("http_request", {"url": server.url + "/status/503"})
    assert caught.value.retryable is True
    assert "answered 503: boom" in str(caught.value)
    out = call_component("http_request", {"url": server.url + "/status/503",
                                          "fail_on_server_error": False})
    assert out["status_code"] == 503 and out["success"] is False


def test_http_connection_refused_is_retryable(closed_port_url):
    with pytest.raises(ComponentError) as caught:
        call_component("http_request", {"url": closed_port_url, "timeout": 5})
    assert caught.value.retryable is True
    assert "could not reach the service" in str(caught.value)


def test_http_timeout_is_retryable(server):
    with pytest.raises(ComponentError) as caught:
        call_component("http_request", {"url": server.url + "/slow", "timeout": 0.2})
    assert caught.value.retryable is True
    assert "no answer within 0.2 s" in str(caught.value)


def test_http_timeout_never_outlives_the_stage(server):
    ctx = make_context("http_request", {"url": server.url + "/slow", "timeout": 30000},
                       timeout_ms=200)
    with pytest.raises(ComponentError, match="no answer within 0.2 s"):
        run_context(ctx)


def test_http_refuses_oversized_responses(server):
    with pytest.raises(ComponentError, match="more than 10 MB"):
        call_component("http_request", {"url": server.url + "/big"})


@pytest.mark.parametrize("inputs,match", [
    ({"url": "ftp://example.com/x"}, "not an http:// or https:// URL"),
    ({"url": "http://127.0.0.1:1/", "method": "FETCH"}, "method 'FETCH'"),
    ({"url": "https://example.com", "verify_ssl": False}, "always verifies TLS"),
    ({"url": "http://127.0.0.1:1/", "headers": {"Authorization": None}}, "Authorization"),
    ({"url": "http://127.0.0.1:1/", "params": {"a": "1"}, "query_params": {"a": "2"}},
     "'query_params' is an alias"),
    ({"url": "http://127.0.0.1:1/", "timeout": 0}, "positive number of seconds"),
    ({"url": "http://127.0.0.1:1/", "body": 5}, "send an object, an array or a string"),
])
def test_http_input_problems(inputs, match):
    with pytest.raises(MappingError, match=match):
        call_component("http_request", inputs)


# -- output_router / error_router -------------------------------------------------------------

def test_output_router_webhooks_and_unavailable_kinds(server, closed_port_url):
    destinations = [
        {"id": "crm", "type": "webhook", "name": "CRM",
         "config": {"url": server.url + "/echo", "headers": {"X-Key": "k"}}},
        {"id": "put", "type": "webhook", "name": "Put",
         "config": {"url": server.url + "/echo", "method": "PUT"}},
        {"id": "mail", "type": "email", "name": "Mail", "config": {"to": ["a@b.c"]}},
        {"id": "off", "type": "webhook", "name": "Off", "enabled": False,
         "config": {"url": server.url + "/echo"}},
        {"id": "errors-only", "type": "webhook", "name": "Errors", "on_success": False,
         "on_error": True, "config": {"url": server.url + "/echo"}},
        {"id": "down", "type": "webhook", "name": "Down",
         "config": {"url": closed_port_url, "retry_count": 2, "retry_backoff_ms": 0}},
    ]
    out = call_component("output_router", {"data": {"answer": 42},
                                           "destinations": destinations,
                                           "metadata": {"run": "r1"}})
    assert sorted(out) == ["all_succeeded", "failed_deliveries", "results",
                           "skipped_deliveries", "successful_deliveries",
                           "total_destinations"]
    assert (out["total_destinations"], out["successful_deliveries"], out["failed_deliveries"],
            out["skipped_deliveries"], out["all_succeeded"]) == (6, 2, 2, 2, False)
    results = {r["destination_id"]: r for r in out["results"]}
    assert sorted(results["crm"]) == ["destination_id", "destination_name",
                                      "destination_type", "duration_ms", "error", "response",
                                      "status_code", "success"]
    assert results["crm"]["success"] is True and results["crm"]["status_code"] == 201
    assert "not available on fm-edge" in results["mail"]["error"]
    assert "could not reach" in results["down"]["error"]
    posted = [s for s in server.seen if s["method"] == "POST"]
    assert len(posted) == 1 and posted[0]["headers"]["X-Key"] == "k"
    payload = json.loads(posted[0]["body"])
    assert sorted(payload) == ["data", "error_message", "is_error", "metadata", "timestamp"]
    assert payload["data"] == {"answer": 42} and payload["metadata"] == {"run": "r1"}
    assert payload["timestamp"].endswith("Z")


def test_output_router_fail_on_error_and_payload_template(server):
    destinations = [{"id": "t", "type": "webhook", "name": "Templated",
                     "payload_template": "{{ data }}", "config": {"url": server.url}}]
    out = call_component("output_router", {"data": 1, "destinations": destinations})
    assert "payload_template" in out["results"][0]["error"]
    with pytest.raises(ComponentError) as caught:
        call_component("output_router", {"data": 1, "destinations": destinations,
                                          "fail_on_error": True})
    assert "Templated" in str(caught.value) and caught.value.retryable is False
    with pytest.raises(MappingError, match="destinations\\[0\\].type 'sms'"):
        call_component("output_router", {"data": 1, "destinations": [{"type": "sms"}]})


def test_error_router_notifies_by_default(server):
    destinations = [{"id": "ops", "type": "webhook", "name": "Ops",
                     "config": {"url": server.url + "/echo"}},
                    {"id": "quiet", "type": "webhook", "name": "Quiet", "on_error": False,
                     "config": {"url": server.url + "/echo"}}]
    out = call_component("error_router", {"error_type": "TIMEOUT", "error_message": "slow",
                                          "stage_id": "fetch", "destinations": destinations,
                                          "severity": "CRITICAL"})
    assert sorted(out) == ["failed_notifications", "notifications_sent", "results"]
    assert out["notifications_sent"] == 1 and out["failed_notifications"] == 0
    payload = json.loads(server.seen[-1]["body"])
    assert payload["is_error"] is True and payload["error_message"] == "slow"
    assert payload["data"]["severity"] == "critical"
    assert payload["data"]["pipeline_id"] == "harness-pipeline"
    assert payload["data"]["stage_id"] == "fetch"
    with pytest.raises(MappingError, match="severity 'fatal'"):
        call_component("error_router", {"error_type": "x", "error_message": "y",
                                        "destinations": [], "severity": "fatal"})


# -- local_file -----------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    """A config whose allowed root is <data_dir>/files (the default), plus that root."""
    config = EdgeConfig(data_dir=str(tmp_path / "edge"))
    root = tmp_path / "edge" / "files"
    return config, root


def local(config, **inputs):
    return call_component("local_file", inputs, config=config)


def test_local_file_roots_default_and_configured(files, tmp_path):
    config, root = files
    ctx = make_context("local_file", {"operation": "exists", "path": "x"}, config=config)
    assert allowed_roots(ctx) == [os.path.realpath(str(root))]
    custom = types.SimpleNamespace(local_file_roots=[str(tmp_path / "a"), str(tmp_path / "b")],
                                   data_dir=str(tmp_path / "edge"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "in.txt").write_text("from b")
    out = call_component("local_file", {"operation": "read", "path": str(tmp_path / "b" /
                                                                         "in.txt")},
                         config=custom)
    assert out["content"] == "from b"
    with pytest.raises(ComponentError, match="outside the directories"):
        call_component("local_file", {"operation": "read", "path": str(root / "x")},
                       config=custom)


def test_local_file_write_read_append_exists_delete(files):
    config, root = files
    written = local(config, operation="write", path="notes/today.txt", content="line 1\n")
    assert written["success"] is True and written["error"] is None
    assert sorted(written) == ["columns", "content", "content_length", "error", "exists",
                               "file_count", "files", "metadata", "operation", "row_count",
                               "rows", "success"]
    assert (root / "notes" / "today.txt").read_text() == "line 1\n"
    local(config, operation="append", path="notes/today.txt", content="line 2\n")
    read = local(config, operation="read", path="notes/today.txt")
    assert read["content"] == "line 1\nline 2\n" and read["content_length"] == 14
    assert read["metadata"]["size_bytes"] == 14
    assert local(config, operation="exists", path="notes/today.txt")["exists"] is True
    assert local(config, operation="delete", path="notes/today.txt")["success"] is True
    assert local(config, operation="exists", path="notes/today.txt")["exists"] is False
    gone = local(config, operation="delete", path="notes/today.txt")
    assert gone["success"] is False and gone["error"].startswith("File not found")
    assert [p for p in os.listdir(str(root / "notes")) if p.startswith(".fm-edge-")] == []


def test_local_file_json_binary_and_csv_formats(files):
    config, root = files
    local(config, operation="write", path="d.json", format="json", content={"a": [1, 2]})
    assert local(config, operation="read", path="d.json", format="json")["content"] == {
        "a": [1, 2]}
    raw = bytes(range(256))
    local(config, operation="write", path="b.bin", format="binary",
          content=base64.b64encode(raw).decode())
    assert (root / "b.bin").read_bytes() == raw
    back = local(config, operation="read", path="b.bin", format="binary")
    assert base64.b64decode(back["content"]) == raw and back["content_length"] == 256
    rows = [{"id": 1, "name": "a"}, {"id": 2, "name": "b", "extra": "x"}]
    local(config, operation="write", path="t.csv", format="csv", content=rows)
    assert (root / "t.csv").read_text().splitlines() == ["id,name,extra", "1,a,", "2,b,x"]
    bad = local(config, operation="write", path="t.csv", format="csv", content="nope")
    assert bad["success"] is False and "list of objects" in bad["error"]
    missing = local(config, operation="write", path="t.txt")
    assert missing["success"] is False and "content parameter is required" in missing["error"]


def test_local_file_parse_csv(files):
    config, root = files
    root.mkdir(parents=True)
    (root / "sales.csv").write_text("# exported\nregion;amount;note;note\nnorth;10;;x\n"
                                    "south;2.5;hi;y\n\n")
    out = local(config, operation="parse_csv", path="sales.csv",
                csv_options={"delimiter": ";", "skip_rows": 1})
    assert out["columns"] == ["region", "amount", "note", "note.1"]
    assert out["rows"] == [{"region": "north", "amount": 10, "note": None, "note.1": "x"},
                           {"region": "south", "amount": 2.5, "note": "hi", "note.1": "y"}]
    assert out["row_count"] == 2
    plain = local(config, operation="parse_csv", path="sales.csv",
                  csv_options={"delimiter": ";", "header": False, "skip_rows": 2})
    assert plain["columns"] == ["0", "1", "2", "3"] and plain["rows"][0]["0"] == "north"


def test_local_file_list(files):
    config, root = files
    (root / "sub").mkdir(parents=True)
    for name in ("a.csv", "b.txt", "sub/c.csv"):
        (root / name).write_text(name)
    flat = local(config, operation="list", path=".", pattern="*.csv")
    assert [f["name"] for f in flat["files"]] == ["a.csv"] and flat["file_count"] == 1
    assert sorted(flat["files"][0]) == ["is_file", "modified", "name", "path", "size"]
    deep = local(config, operation="list", path=".", pattern="*.csv", recursive=True)
    assert [f["name"] for f in deep["files"]] == ["a.csv", "c.csv"]
    escape = local(config, operation="list", path="sub", pattern="../../*")
    assert escape["files"] == []
    not_dir = local(config, operation="list", path="a.csv")
    assert not_dir["success"] is False and "not a directory" in not_dir["error"]


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/hostname", "sub/../../x"])
def test_local_file_refuses_paths_outside_the_roots(files, path):
    config, _ = files
    with pytest.raises(ComponentError, match="outside the directories this device allows"):
        local(config, operation="read", path=path)


def test_local_file_refuses_symlink_escapes(files, tmp_path):
    config, root = files
    root.mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (root / "link.txt").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path)
    with pytest.raises(ComponentError, match="outside"):
        local(config, operation="read", path="link.txt")
    with pytest.raises(ComponentError, match="outside"):
        local(config, operation="write", path="dirlink/new.txt", content="x")
    assert not (tmp_path / "new.txt").exists()
    listed = local(config, operation="list", path=".", pattern="*")
    assert [f["name"] for f in listed["files"]] == []


def test_local_file_operation_problems(files):
    config, _ = files
    unknown = local(config, operation="copy", path="x")
    assert unknown["success"] is False and "Invalid operation 'copy'" in unknown["error"]
    with pytest.raises(ComponentError, match="parse_excel is not available on this device"):
        local(config, operation="parse_excel", path="book.xlsx")
    missing = local(config, operation="read", path="nope.txt")
    assert missing["success"] is False and "File not found" in missing["error"]
    assert "execution_time_ms" in missing["metadata"]
