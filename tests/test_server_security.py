"""The HTTP API's guards (reliability.md §3) over real HTTP on 127.0.0.1.

Bind address, bearer token, Host/Origin (DNS rebinding, CSRF), body and head limits,
framing, path traversal in ids, idle and slow clients, connection limits, secrets in logs.
"""

import hmac
import http.client
import json
import logging
import socket

import pytest

from server_fixture import (SENSOR_INPUTS, TOKEN, make_runtime, read_until_closed,
                            running_server, wait_until)

from fmedge.errors import ConfigError
from fmedge.server import EdgeServer
from fmedge.server_security import (ServerLimits, check_bind, is_loopback_host, parse_host,
                                    token_matches)


@pytest.fixture
def api(tmp_path):
    with running_server(tmp_path) as handle:
        yield handle


@pytest.fixture
def secured(tmp_path):
    with running_server(tmp_path, api_token=TOKEN) as handle:
        yield handle


def status_of(raw_answer):
    return int(raw_answer.split(b" ", 2)[1])


def body_of(raw_answer):
    return json.loads(raw_answer.split(b"\r\n\r\n", 1)[1])


# -- bind address -----------------------------------------------------------------------------

def test_non_loopback_bind_without_token_is_refused(tmp_path):
    runtime = make_runtime(tmp_path, host="0.0.0.0")
    with pytest.raises(ConfigError, match="api_token"):
        EdgeServer(runtime, port=0)
    with pytest.raises(ConfigError, match="api_token"):
        check_bind("", "")
    check_bind("::1", "")
    check_bind("localhost", "")


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False),
    ("192.168.1.10", False), ("device.local", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback_host(host) is loopback


def test_non_loopback_bind_with_token_serves_any_host_name_but_needs_the_token(tmp_path):
    with running_server(tmp_path, host="0.0.0.0", api_token=TOKEN) as api:
        named = api.client.get("/runs", headers={"Host": "edge-device.local:8080"})
        assert named.status == 200
        assert api.client_with(token=None).get("/runs").status == 401


def test_ipv6_loopback_bind(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with running_server(tmp_path, host="::1") as api:
            answer = api.client.get("/health", headers={"Host": f"[::1]:{api.port}"})
            assert answer.status == 200
    except ConfigError as error:
        pytest.skip(f"cannot bind ::1 here: {error}")


# -- bearer token -----------------------------------------------------------------------------

def test_every_endpoint_but_health_needs_the_token(secured):
    anonymous = secured.client_with(token=None)
    wrong = secured.client_with(token="not-the-token")
    for method, path in (("GET", "/runs"), ("GET", "/pipelines"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("GET", "/status/" + "0" * 32),
                         ("POST", "/sync"), ("POST", "/run/data-processor")):
        for client in (anonymous, wrong):
            answer = client.request(method, path)
            assert answer.status == 401, (method, path, answer)
            assert answer.error_code == "unauthorized"
            assert answer.headers["www-authenticate"].startswith("Bearer")
    assert secured.client.run("data-processor", SENSOR_INPUTS).status == 200


def test_health_needs_no_token_and_shows_details_only_with_it(secured):
    anonymous = secured.client_with(token=None).get("/health")
    assert anonymous.status == 200 and anonymous.json() == {"status": "ok", "ready": True}
    wrong = secured.client_with(token="nope").get("/health").json()
    assert "checks" not in wrong
    assert "checks" in secured.client.get("/health").json()


def test_other_schemes_and_query_tokens_are_refused(secured):
    anonymous = secured.client_with(token=None)
    basic = anonymous.get("/runs", headers={"Authorization": "Basic " + TOKEN})
    assert basic.status == 401
    in_query = anonymous.get(f"/runs?token={TOKEN}")
    assert in_query.status == 400 and in_query.error_code == "credentials_in_query"
    assert secured.client.get(f"/runs?access_token={TOKEN}").status == 400


def test_token_comparison_is_constant_time_on_bytes(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cre", "s3cret")
    assert not token_matches("s3crét", "s3cret")        # non-ASCII: no TypeError
    assert calls == [(bytes, bytes)] * 3


def test_the_token_never_reaches_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with running_server(tmp_path, api_token=TOKEN) as api:
        api.client.run("data-processor", SENSOR_INPUTS)
        api.client.get(f"/runs?api_token={TOKEN}")
        api.client_with(token=TOKEN + "x").get("/runs")
        api.client.get("/nowhere")
    assert TOKEN not in caplog.text
    assert "GET /runs -> 400" in caplog.text      # requests are logged, without queries


# -- Host and Origin --------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.com",
                                  "127.0.0.1.nip.io", "10.0.0.5"])
def test_foreign_host_names_are_refused_on_a_loopback_bind(api, host):
    answer = api.client.get("/health", headers={"Host": host})
    assert answer.status == 421 and answer.error_code == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:9", "127.0.0.1:8080", "[::1]:8080",
                                  "[::1]"])
def test_loopback_host_names_are_accepted(api, host):
    assert api.client.get("/health", headers={"Host": host}).status == 200


def test_missing_empty_and_malformed_hosts_are_400(api):
    missing = api.raw(b"GET /health HTTP/1.0\r\n\r\n")
    assert status_of(missing) == 400 and body_of(missing)["error"]["code"] == "missing_host"
    empty = api.raw(b"GET /health HTTP/1.1\r\nHost: :8080\r\n\r\n")
    assert status_of(empty) == 400
    for bad in (b"::1", b"[::1", b"localhost:80x"):
        assert status_of(api.raw(b"GET /health HTTP/1.1\r\nHost: " + bad + b"\r\n\r\n")) == 400


@pytest.mark.parametrize("host, expected", [
    ("localhost", "localhost"), ("LocalHost:80", "localhost"), ("[::1]:1", "::1"),
    ("127.0.0.1", "127.0.0.1"), (":80", None), ("::1", None), ("a:b", None), ("", None)])
def test_parse_host(host, expected):
    assert parse_host(host) == expected


def test_cross_origin_requests_are_refused(api):
    evil = api.client.run("data-processor", SENSOR_INPUTS,
                          headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and evil.error_code == "origin_not_allowed"
    assert api.client.get("/health", headers={"Origin": "null"}).status == 403
    same = api.client.get("/health", headers={"Origin": f"http://127.0.0.1:{api.port}"})
    assert same.status == 200
    assert "access-control-allow-origin" not in same.headers
    preflight = api.client.request("OPTIONS", "/run/data-processor",
                                   headers={"Origin": "http://localhost:3000"})
    assert preflight.status == 405 and "access-control-allow-origin" not in preflight.headers


# -- bodies: size, framing, content ------------------------------------------------------------

def test_oversized_body_is_refused_before_it_is_read(api):
    head = (b"POST /run/data-processor HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n")
    answer = api.raw(head)
    assert status_of(answer) == 413 and body_of(answer)["error"]["code"] == "body_too_large"


def test_oversized_body_sent_in_full_still_gets_413(api):
    big = json.dumps({"sensor_data": [1] * 700000}).encode()
    assert len(big) > 1024 * 1024
    answer = api.client.request("POST", "/run/data-processor", body=big,
                                headers={"Content-Type": "application/json"})
    assert answer.status == 413


def test_expect_100_continue_gets_413_instead_of_continue(api):
    head = (b"POST /run/data-processor HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue"
            b"\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n")
    answer = api.raw(head)
    assert status_of(answer) == 413 and b"100 Continue" not in answer


def test_chunked_bodies_are_refused_with_411(api):
    chunked = (b"POST /run/data-processor HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\n{}\r\n0\r\n\r\n")
    assert status_of(api.raw(chunked)) == 411
    both = (b"POST /run/data-processor HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n{}")
    assert status_of(api.raw(both)) == 400


def test_headers_over_the_limit_are_431(tmp_path):
    with running_server(tmp_path, limits=ServerLimits(max_head_bytes=2048)) as api:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 4096
        assert status_of(api.raw(head)) == 431


def test_a_bad_request_keeps_a_keep_alive_connection_in_sync(api):
    conn = http.client.HTTPConnection(api.host, api.port, timeout=10)
    conn.request("POST", "/run/data-processor", body=b"{nope",
                 headers={"Content-Type": "application/json"})
    refused = conn.getresponse()
    assert refused.status == 400 and b"malformed_json" in refused.read()
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


# -- ids: no traversal ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/run/..%2F..%2Fetc", "/run/..", "/run/a%2Fb",
                                  "/run/%2E%2E", "/run/x%00y", "/run/-x"])
def test_traversal_in_pipeline_ids_is_400(api, path):
    answer = api.client.post(path, json_body={})
    assert answer.status == 400 and answer.error_code == "invalid_id"


@pytest.mark.parametrize("path", ["/status/..%2F..%2Fetc%2Fpasswd", "/status/..",
                                  "/status/%5C..%5Cx"])
def test_traversal_in_run_ids_is_400(api, path):
    assert api.client.get(path).status == 400


def test_raw_dot_segments_match_no_route(api):
    answer = api.raw(b"GET /status/../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: close\r\n\r\n")
    assert status_of(answer) == 404


# -- idle and slow clients, connection limits ----------------------------------------------------

def test_500_idle_connections_do_not_stop_health(tmp_path):
    with running_server(tmp_path) as api:
        idle = [socket.create_connection((api.host, api.port), timeout=10)
                for _ in range(500)]
        try:
            # "within 1 s", as a client timeout: a server pinned by idle clients fails here.
            answer = api.client_with(timeout=1.0).get("/health")
            assert answer.status == 200
        finally:
            for sock in idle:
                sock.close()


def test_idle_connections_are_closed_after_the_idle_timeout(tmp_path):
    limits = ServerLimits(idle_timeout_s=0.3)
    with running_server(tmp_path, limits=limits) as api:
        sock = socket.create_connection((api.host, api.port), timeout=10)
        assert read_until_closed(sock) == b""       # closed by the server, not by us
        sock.close()
        wait_until(lambda: api.server.http.open_connections == 0, what="the close")


def test_a_slow_header_sender_gets_408_and_pins_no_thread(tmp_path):
    limits = ServerLimits(head_timeout_s=0.5, max_workers=2, quick_workers=1)
    with running_server(tmp_path, limits=limits) as api:
        slow = [socket.create_connection((api.host, api.port), timeout=10) for _ in range(5)]
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # never ends
        assert api.client_with(timeout=1.0).get("/health").status == 200
        for sock in slow:
            assert status_of(read_until_closed(sock)) == 408
            sock.close()


def test_a_slow_body_sender_gets_408(tmp_path):
    with running_server(tmp_path, limits=ServerLimits(io_timeout_s=0.5)) as api:
        sock = socket.create_connection((api.host, api.port), timeout=10)
        sock.sendall(b"POST /run/data-processor HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        assert status_of(read_until_closed(sock)) == 408
        sock.close()


def test_connections_over_the_limit_get_503(tmp_path):
    with running_server(tmp_path, limits=ServerLimits(max_connections=10)) as api:
        held = [socket.create_connection((api.host, api.port), timeout=10) for _ in range(10)]
        wait_until(lambda: api.server.http.open_connections == 10, what="10 connections")
        extra = api.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status_of(extra) == 503 and b"Retry-After: 1" in extra
        for sock in held:
            sock.close()
        wait_until(lambda: api.server.http.open_connections == 0, what="the closes")
        assert api.client.get("/health").status == 200


def test_busy_executor_answers_429_with_retry_after(tmp_path):
    from server_fixture import Gate, gated_pipeline

    with Gate() as gate, running_server(tmp_path, max_concurrent=1,
                                        max_queued_runs=0) as api:
        api.runtime.pipelines.store_now("gated", gated_pipeline(gate.url))
        assert api.client.run("gated", {}, wait=False).status == 202
        wait_until(lambda: gate.arrived == 1, what="the run to start")
        busy = api.client.run("gated", {}, wait=False)
        assert busy.status == 429 and busy.error_code == "busy"
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["retryable"]
        gate.open()


def test_error_messages_do_not_show_the_data_dir(api):
    data_dir = api.runtime.config.data_dir
    assert api.server.scrub(f"cannot write {data_dir}/results/x.db") == \
        "cannot write DATA_DIR/results/x.db"
