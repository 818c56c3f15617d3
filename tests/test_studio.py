"""tools/studio.py over real HTTP: auth, results de-duplication, limits, pipelines, models."""

import gzip
import hashlib
import json
import os

import pytest
import urllib3

from studio_fixture import (API_KEY, DEVICE_ID, StudioProcess, make_tls_files, run_studio_cli,
                            start_studio, studio_server)  # noqa: F401  (a fixture)

EDGE = "/api/v1/edge"
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))


def call(server, method, path, body=None, headers=None, key=API_KEY, device=DEVICE_ID):
    """One request to the studio; returns the (fully read) urllib3 response."""
    sent = {}
    if key is not None:
        sent["Authorization"] = "Bearer " + key
    if device is not None:
        sent["X-Device-Id"] = device
    sent.update(headers or {})
    url = server.url + (path if path.startswith("/_") else EDGE + path)
    return HTTP.request(method, url, body=body, headers=sent, redirect=False)


def post_results(server, items, key="k-1", gzipped=True, device=DEVICE_ID):
    raw = json.dumps({"results": items}).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    if gzipped:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    return call(server, "POST", "/results", raw, headers, device=device)


def result(run_id, pipeline_id="p1", status="completed", **extra):
    return dict({"run_id": run_id, "pipeline_id": pipeline_id, "status": status}, **extra)


def error_of(response):
    return json.loads(response.data)["error"]


def push(server, document, pipeline_id=None):
    return server.store.push_pipeline(json.dumps(document).encode(), pipeline_id)


# -- auth and framing ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, "", "wrong-key", API_KEY[:-1] + "X", API_KEY + "x"])
def test_every_call_needs_the_bearer_key(studio_server, key):
    response = call(studio_server, "GET", "/ping", key=key)
    assert response.status == 401
    assert error_of(response)["code"] == "auth_failed"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_right_key_and_device_id_get_in(studio_server):
    response = call(studio_server, "GET", "/ping")
    assert response.status == 200
    assert json.loads(response.data)["ok"] is True


@pytest.mark.parametrize("device", [None, "", "../etc", "a b"])
def test_device_calls_need_a_valid_device_id(studio_server, device):
    response = call(studio_server, "GET", "/ping", device=device)
    assert response.status == 400
    assert error_of(response)["code"] == "bad_device_id"


def test_unknown_endpoint_and_wrong_method_answer_json(studio_server):
    missing = call(studio_server, "GET", "/nope")
    assert missing.status == 404 and error_of(missing)["code"] == "not_found"
    wrong = call(studio_server, "GET", "/results")
    assert wrong.status == 405 and wrong.headers["Allow"] == "POST"
    outside = HTTP.request("GET", studio_server.url + "/index.html")
    assert outside.status == 404 and "message" in error_of(outside)


def test_request_bodies_are_bounded_and_framed(studio_server):
    huge = call(studio_server, "POST", "/devices/register", b"{" + b" " * 70000 + b"}",
                {"Content-Type": "application/json"})
    assert huge.status == 413
    chunked = HTTP.urlopen("POST", studio_server.url + EDGE + "/devices/register",
                           body=iter([b"{}"]), chunked=True,
                           headers={"Authorization": "Bearer " + API_KEY,
                                    "X-Device-Id": DEVICE_ID})
    assert chunked.status == 411


# -- results -------------------------------------------------------------------------------------

def test_results_are_deduplicated_across_batches(studio_server):
    first = post_results(studio_server, [result("r1"), result("r2")], key="k-1")
    assert first.status == 200
    assert json.loads(first.data) == {"accepted": ["r1", "r2"], "duplicate": [], "rejected": []}
    second = post_results(studio_server, [result("r2"), result("r3")], key="k-2")
    assert json.loads(second.data) == {"accepted": ["r3"], "duplicate": ["r2"], "rejected": []}
    stored = [row["run_id"] for row in studio_server.store.list_results()]
    assert sorted(stored) == ["r1", "r2", "r3"]
    assert studio_server.store.count_deliveries() == 4   # the wire saw r2 twice


def test_a_replayed_idempotency_key_gets_the_same_answer(studio_server):
    items = [result("r1"), result("r2", status="failed", error="boom")]
    first = post_results(studio_server, items, key="batch-7")
    replay = post_results(studio_server, items, key="batch-7")
    assert replay.status == 200
    assert json.loads(replay.data) == json.loads(first.data)
    assert json.loads(replay.data)["accepted"] == ["r1", "r2"]   # not "duplicate"
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert len(studio_server.store.list_results()) == 2


def test_reusing_a_key_for_other_content_is_refused(studio_server):
    post_results(studio_server, [result("r1")], key="k-1")
    response = post_results(studio_server, [result("r9")], key="k-1")
    assert response.status == 422
    assert error_of(response)["code"] == "idempotency_key_reused"
    assert [row["run_id"] for row in studio_server.store.list_results()] == ["r1"]


def test_idempotency_keys_belong_to_one_device(studio_server):
    post_results(studio_server, [result("r1")], key="k-1", device="dev-a")
    other = post_results(studio_server, [result("r2")], key="k-1", device="dev-b")
    assert json.loads(other.data)["accepted"] == ["r2"]


def test_a_batch_without_idempotency_key_is_refused(studio_server):
    body = gzip.compress(json.dumps({"results": [result("r1")]}).encode())
    response = call(studio_server, "POST", "/results", body, {"Content-Encoding": "gzip"})
    assert response.status == 400
    assert error_of(response)["code"] == "bad_idempotency_key"


def test_malformed_results_are_rejected_with_reasons(studio_server):
    items = [
        result("ok-1"),
        {"pipeline_id": "p1", "status": "completed"},
        {"run_id": "r-np", "status": "completed"},
        {"run_id": "r-ns", "pipeline_id": "p1"},
        result("r-run", status="running"),
        result(42),
        "not an object",
        result("x" * 200),
    ]
    answer = json.loads(post_results(studio_server, items).data)
    assert answer["accepted"] == ["ok-1"]
    reasons = {entry["index"]: (entry["run_id"], entry["reason"]) for entry in answer["rejected"]}
    assert reasons[1] == (None, "missing run_id")
    assert reasons[2] == ("r-np", "missing pipeline_id")
    assert reasons[3] == ("r-ns", "missing status")
    assert "not a finished run" in reasons[4][1]
    assert reasons[5] == (None, "run_id must be a string, got int")
    assert reasons[6] == (None, "result is not a JSON object")
    assert "limit is 128" in reasons[7][1]


def test_poison_results_are_rejected_while_the_rest_goes_through(studio_server):
    studio_server.faults.poison.add("bad")
    answer = json.loads(post_results(studio_server, [result("bad"), result("good")]).data)
    assert answer["accepted"] == ["good"]
    assert answer["rejected"][0]["run_id"] == "bad"


def test_plain_json_batches_are_accepted_too(studio_server):
    answer = json.loads(post_results(studio_server, [result("r1")], gzipped=False).data)
    assert answer["accepted"] == ["r1"]


def test_more_than_500_results_is_413(studio_server):
    response = post_results(studio_server, [result("r%d" % i) for i in range(501)])
    assert response.status == 413
    assert error_of(response)["code"] == "batch_too_large"
    assert studio_server.store.list_results() == []


def test_a_body_over_one_mib_is_413_before_reading(studio_server):
    body = os.urandom(1024 * 1024 + 1)   # incompressible, so the gzip stays over the limit
    response = call(studio_server, "POST", "/results", body,
                    {"Content-Encoding": "gzip", "Idempotency-Key": "k"})
    assert response.status == 413


def test_a_gzip_bomb_is_413(studio_server):
    bomb = gzip.compress(b'{"results": [' + b" " * (17 * 1024 * 1024) + b"]}")
    assert len(bomb) < 1024 * 1024
    response = call(studio_server, "POST", "/results", bomb,
                    {"Content-Encoding": "gzip", "Idempotency-Key": "k"})
    assert response.status == 413


@pytest.mark.parametrize("body, encoding, status", [
    (b"not gzip", "gzip", 400),
    (gzip.compress(b'{"results": [')[:-8], "gzip", 400),
    (b'{"results": [', "", 400),
    (b'{"results": [{"run_id": NaN}]}', "", 400),
    (b'{"results": {}}', "", 400),
    (b'{"results": []}', "br", 415),
])
def test_undecodable_batches_are_refused(studio_server, body, encoding, status):
    response = call(studio_server, "POST", "/results", body,
                    {"Content-Encoding": encoding, "Idempotency-Key": "k"})
    assert response.status == status


def test_results_survive_a_restart_and_stay_deduplicated(tmp_path):
    server = start_studio(tmp_path)
    post_results(server, [result("r1")], key="k-1")
    server.stop()
    server = start_studio(tmp_path)
    try:
        replay = json.loads(post_results(server, [result("r1")], key="k-1").data)
        fresh = json.loads(post_results(server, [result("r1")], key="k-2").data)
    finally:
        server.stop()
    assert replay["accepted"] == ["r1"]
    assert fresh["duplicate"] == ["r1"]


# -- devices -------------------------------------------------------------------------------------

def test_register_then_heartbeat_is_stored(studio_server):
    info = {"name": "pi-7", "version": "0.1.0", "platform": "linux-aarch64",
            "capabilities": ["ollama"]}
    assert call(studio_server, "POST", "/devices/register", json.dumps(info).encode()).status == 200
    beat = {"status": "online", "queue_depth": 3, "disk_free": 123, "pipelines": {"p1": "1.0.0"}}
    response = call(studio_server, "POST", "/devices/%s/heartbeat" % DEVICE_ID,
                    json.dumps(beat).encode())
    assert response.status == 200
    assert "pipelines_cursor" in json.loads(response.data)
    [device] = studio_server.store.list_devices()
    assert device["device_id"] == DEVICE_ID and device["name"] == "pi-7"
    assert device["heartbeat"] == beat and device["last_heartbeat"]


def test_heartbeat_from_an_unregistered_device_is_404(studio_server):
    response = call(studio_server, "POST", "/devices/%s/heartbeat" % DEVICE_ID, b"{}")
    assert response.status == 404
    assert "register" in error_of(response)["message"]


def test_heartbeat_for_another_device_is_refused(studio_server):
    response = call(studio_server, "POST", "/devices/someone-else/heartbeat", b"{}")
    assert response.status == 400


# -- pipelines -----------------------------------------------------------------------------------

def test_pipeline_document_has_an_etag_and_answers_304(studio_server):
    entry = push(studio_server, {"name": "p1", "version": "1.0.0", "stages": []})
    response = call(studio_server, "GET", "/pipelines/p1")
    assert response.status == 200
    assert hashlib.sha256(response.data).hexdigest() == entry["sha256"]
    assert response.headers["ETag"] == '"%s"' % entry["sha256"]
    assert response.headers["X-Pipeline-Version"] == "1.0.0"
    again = call(studio_server, "GET", "/pipelines/p1",
                 headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304 and again.data == b""
    stale = call(studio_server, "GET", "/pipelines/p1", headers={"If-None-Match": '"0000"'})
    assert stale.status == 200


def test_changes_feed_reports_updates_and_deletions(studio_server):
    push(studio_server, {"name": "a", "stages": []})
    push(studio_server, {"name": "b", "version": "2.0.0", "stages": []})
    feed = json.loads(call(studio_server, "GET", "/pipelines?since=0").data)
    assert [(c["id"], c["version"], c["deleted"]) for c in feed["changes"]] == [
        ("a", "1", False), ("b", "2.0.0", False)]
    cursor = feed["cursor"]
    assert json.loads(call(studio_server, "GET", "/pipelines?since=%d" % cursor).data)[
        "changes"] == []
    push(studio_server, {"name": "a", "stages": [], "description": "v2"})
    studio_server.store.delete_pipeline("b")
    later = json.loads(call(studio_server, "GET", "/pipelines?since=%d" % cursor).data)
    assert [(c["id"], c["version"], c["deleted"]) for c in later["changes"]] == [
        ("a", "2", False), ("b", "2.0.0", True)]
    assert later["cursor"] > cursor
    assert call(studio_server, "GET", "/pipelines/b").status == 404


def test_pushing_the_same_document_makes_no_change(studio_server):
    push(studio_server, {"name": "a", "stages": []})
    again = push(studio_server, {"name": "a", "stages": []})
    assert again["changed"] is False
    assert len(json.loads(call(studio_server, "GET", "/pipelines").data)["changes"]) == 1


def test_changes_feed_pages_and_recovers_from_a_future_cursor(studio_server):
    for name in ("a", "b", "c"):
        push(studio_server, {"name": name, "stages": []})
    page = json.loads(call(studio_server, "GET", "/pipelines?since=0&limit=2").data)
    assert [c["id"] for c in page["changes"]] == ["a", "b"] and page["more"] is True
    rest = json.loads(call(studio_server, "GET", "/pipelines?since=%d" % page["cursor"]).data)
    assert [c["id"] for c in rest["changes"]] == ["c"] and rest["more"] is False
    future = json.loads(call(studio_server, "GET", "/pipelines?since=999").data)
    assert future["reset"] is True and len(future["changes"]) == 3
    assert call(studio_server, "GET", "/pipelines?since=-1").status == 400


def test_bad_pipeline_ids_are_refused(studio_server):
    for path in ("/pipelines/..", "/pipelines/%2e%2e", "/pipelines/a%2fb"):
        assert call(studio_server, "GET", path).status in (400, 404)


# -- models --------------------------------------------------------------------------------------

@pytest.fixture
def model(studio_server, tmp_path):
    data = os.urandom(300 * 1024 + 17)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(data)
    studio_server.store.add_model("tiny.gguf", str(path))
    return data


def test_model_manifest_names_size_and_sha256(studio_server, model):
    manifest = json.loads(call(studio_server, "GET", "/models/tiny.gguf").data)
    assert manifest["size"] == len(model)
    assert manifest["sha256"] == hashlib.sha256(model).hexdigest()
    assert call(studio_server, "GET", "/models/other").status == 404


def test_model_file_whole_and_resumed_by_range(studio_server, model):
    whole = call(studio_server, "GET", "/models/tiny.gguf/file")
    assert whole.status == 200 and whole.data == model
    assert whole.headers["Accept-Ranges"] == "bytes"
    head = call(studio_server, "GET", "/models/tiny.gguf/file",
                headers={"Range": "bytes=0-99999"})
    assert head.status == 206
    assert head.headers["Content-Range"] == "bytes 0-99999/%d" % len(model)
    tail = call(studio_server, "GET", "/models/tiny.gguf/file",
                headers={"Range": "bytes=%d-" % len(head.data)})
    assert tail.status == 206
    assert head.data + tail.data == model


def test_suffix_and_clamped_ranges(studio_server, model):
    last = call(studio_server, "GET", "/models/tiny.gguf/file", headers={"Range": "bytes=-10"})
    assert last.status == 206 and last.data == model[-10:]
    clamped = call(studio_server, "GET", "/models/tiny.gguf/file",
                   headers={"Range": "bytes=%d-99999999" % (len(model) - 5)})
    assert clamped.data == model[-5:]


@pytest.mark.parametrize("wanted", ["bytes=999999999-", "bytes=10-5", "bytes=-0", "bytes=abc",
                                    "bytes=0-1,5-6", "items=0-1"])
def test_unsatisfiable_or_malformed_ranges_are_416(studio_server, model, wanted):
    response = call(studio_server, "GET", "/models/tiny.gguf/file", headers={"Range": wanted})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */%d" % len(model)


def test_if_range_for_another_file_gets_the_whole_file(studio_server, model):
    response = call(studio_server, "GET", "/models/tiny.gguf/file",
                    headers={"Range": "bytes=100-", "If-Range": '"%s"' % ("0" * 64)})
    assert response.status == 200 and response.data == model
    current = '"%s"' % hashlib.sha256(model).hexdigest()
    resumed = call(studio_server, "GET", "/models/tiny.gguf/file",
                   headers={"Range": "bytes=100-", "If-Range": current})
    assert resumed.status == 206 and resumed.data == model[100:]


def test_model_file_over_tls_whole_and_by_range(tmp_path):
    # Plain HTTP sends the file with sendfile(2); over TLS the bytes pass through Python.
    tls = make_tls_files(tmp_path)
    server = start_studio(tmp_path, tls=tls)
    try:
        data = os.urandom(1024 * 1024 + 5)
        (tmp_path / "m.gguf").write_bytes(data)
        server.store.add_model("m", str(tmp_path / "m.gguf"))
        pool = urllib3.PoolManager(ca_certs=tls.ca_cert, retries=False)
        url = server.url + EDGE + "/models/m/file"
        auth = {"Authorization": "Bearer " + API_KEY, "X-Device-Id": DEVICE_ID}
        whole = pool.request("GET", url, headers=auth)
        assert whole.status == 200 and whole.data == data
        tail = pool.request("GET", url, headers=dict(auth, Range="bytes=1000-"))
        assert tail.status == 206 and tail.data == data[1000:]
        pool.clear()
    finally:
        server.stop()


# -- faults --------------------------------------------------------------------------------------

def test_injected_failures_carry_retry_after_then_stop(studio_server):
    studio_server.faults.fail(503, times=2, retry_after=7, path="/ping")
    for _ in range(2):
        response = call(studio_server, "GET", "/ping")
        assert response.status == 503 and response.headers["Retry-After"] == "7"
    assert call(studio_server, "GET", "/ping").status == 200


def test_drop_after_commit_stores_but_never_answers(studio_server):
    studio_server.faults.drop_after_commit(path="/results")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        post_results(studio_server, [result("r1")], key="k-1")
    assert [row["run_id"] for row in studio_server.store.list_results()] == ["r1"]


# -- the command line ----------------------------------------------------------------------------

def test_cli_push_delete_and_listings(tmp_path):
    db = tmp_path / "studio.db"
    doc = tmp_path / "p.json"
    doc.write_text(json.dumps({"name": "demo", "version": "1.2.0", "stages": []}))
    pushed = run_studio_cli(db, "push", str(doc))
    assert "pushed demo version 1.2.0" in pushed.stdout
    assert "unchanged" in run_studio_cli(db, "push", str(doc)).stdout
    listed = json.loads(run_studio_cli(db, "pipelines", "--json").stdout)
    assert [(p["id"], p["version"], p["deleted"]) for p in listed] == [("demo", "1.2.0", False)]
    assert "deleted demo" in run_studio_cli(db, "delete", "demo").stdout
    missing = run_studio_cli(db, "delete", "demo", check=False)
    assert missing.returncode == 1 and "no pipeline 'demo'" in missing.stderr
    assert json.loads(run_studio_cli(db, "pipelines", "--json").stdout)[0]["deleted"] is True


def test_cli_push_versions_auto_increment_without_a_version_field(tmp_path):
    db = tmp_path / "studio.db"
    doc = tmp_path / "p.json"
    for number in (1, 2):
        doc.write_text(json.dumps({"id": "auto", "name": "Auto", "stages": [], "n": number}))
        assert "version %d" % number in run_studio_cli(db, "push", str(doc)).stdout


def test_cli_refuses_a_bad_document(tmp_path):
    doc = tmp_path / "bad.json"
    doc.write_text("[1, 2")
    done = run_studio_cli(tmp_path / "studio.db", "push", str(doc), check=False)
    assert done.returncode == 1 and "not valid JSON" in done.stderr


def test_cli_lists_results_and_devices_of_a_running_studio(tmp_path):
    proc = StudioProcess(tmp_path)
    try:
        server = type("S", (), {"url": proc.url})
        assert call(server, "POST", "/devices/register", b'{"name": "pi"}').status == 200
        assert post_results(server, [result("r1")]).status == 200
        doc = tmp_path / "p.json"
        doc.write_text(json.dumps({"name": "live", "stages": []}))
        run_studio_cli(proc.db_path, "push", str(doc))   # while the server runs
        feed = json.loads(call(server, "GET", "/pipelines").data)
        assert [c["id"] for c in feed["changes"]] == ["live"]
        results = json.loads(run_studio_cli(proc.db_path, "results", "--json").stdout)
        devices = json.loads(run_studio_cli(proc.db_path, "devices", "--json").stdout)
    finally:
        proc.stop()
    assert [(r["run_id"], r["device_id"]) for r in results] == [("r1", DEVICE_ID)]
    assert [(d["device_id"], d["name"]) for d in devices] == [(DEVICE_ID, "pi")]
    assert proc.proc.returncode == 0   # SIGTERM is a clean stop


def test_cli_add_model_then_serve_it(tmp_path):
    data = os.urandom(5000)
    (tmp_path / "m.bin").write_bytes(data)
    db = tmp_path / "studio.db"
    assert "5000 bytes" in run_studio_cli(db, "add-model", "m1", str(tmp_path / "m.bin")).stdout
    server = start_studio(tmp_path)
    try:
        assert call(server, "GET", "/models/m1/file").data == data
    finally:
        server.stop()


def test_fault_api_over_http_when_enabled(tmp_path):
    proc = StudioProcess(tmp_path, extra_args=["--fault-api"])
    try:
        server = type("S", (), {"url": proc.url})
        spec = {"action": "fail", "status": 429, "times": 1, "retry_after": 3}
        assert call(server, "POST", "/_studio/faults", json.dumps(spec).encode()).status == 200
        limited = call(server, "GET", "/ping")
        assert limited.status == 429 and limited.headers["Retry-After"] == "3"
        assert call(server, "GET", "/ping").status == 200
    finally:
        proc.stop()


def test_fault_api_is_off_by_default(studio_server):
    response = call(studio_server, "POST", "/_studio/faults", b'{"action": "clear"}')
    assert response.status == 404


def test_serving_without_a_key_is_refused(tmp_path):
    done = run_studio_cli(tmp_path / "s.db", "--api-key", "", check=False)
    assert done.returncode == 2 and "API key" in done.stderr
