"""CloudClient against a real studio: each protocol call, each error mapping, TLS."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import urllib3

import fmedge
from fmedge.errors import (AuthError, BusyError, ConfigError, FmEdgeError, NotFoundError,
                           OfflineError, UsageError)
from fmedge.sync.client import CloudClient, parse_retry_after
from studio_fixture import (API_KEY, DEVICE_ID, STUDIO_SCRIPT, chaos_proxy,  # noqa: F401
                            make_tls_files, port_of, start_studio, studio_server,
                            wait_until)


def client_for(url, key=API_KEY, **kwargs):
    kwargs.setdefault("connect_timeout", 5)
    kwargs.setdefault("read_timeout", 10)
    return CloudClient(url, key, DEVICE_ID, **kwargs)


@pytest.fixture
def client(studio_server):
    cloud = client_for(studio_server.url)
    yield cloud
    cloud.close()


def result(run_id, status="completed"):
    return {"run_id": run_id, "pipeline_id": "p1", "status": status, "output": {"x": 1}}


def push(server, document):
    return server.store.push_pipeline(json.dumps(document).encode())


@pytest.fixture
def model(studio_server, tmp_path):
    data = os.urandom(256 * 1024 + 3)
    (tmp_path / "m.gguf").write_bytes(data)
    studio_server.store.add_model("m.gguf", str(tmp_path / "m.gguf"))
    return data


# -- the happy path ------------------------------------------------------------------------------

def test_ping_sends_auth_device_and_user_agent(client, studio_server):
    assert client.ping()["ok"] is True
    [seen] = studio_server.requests
    assert seen["x-device-id"] == DEVICE_ID
    assert seen["user-agent"] == "fm-edge/%s" % fmedge.__version__


def test_cloud_url_may_already_end_with_the_api_path(studio_server):
    with client_for(studio_server.url + "/api/v1/edge/") as cloud:
        assert cloud.ping()["ok"] is True


def test_register_and_heartbeat(client, studio_server):
    with pytest.raises(NotFoundError):
        client.heartbeat({"status": "online"})   # the studio does not know the device yet
    client.register({"name": "pi-1", "version": "0.1.0", "platform": "linux"})
    answer = client.heartbeat({"status": "online", "queue_depth": 2})
    assert answer["ok"] is True
    [device] = studio_server.store.list_devices()
    assert device["heartbeat"] == {"status": "online", "queue_depth": 2}


def test_pipeline_changes_and_documents(client, studio_server):
    entry = push(studio_server, {"name": "p1", "version": "1.0.0", "stages": []})
    feed = client.pipeline_changes(0)
    assert [(c["id"], c["sha256"], c["deleted"]) for c in feed["changes"]] == [
        ("p1", entry["sha256"], False)]
    assert client.pipeline_changes(feed["cursor"])["changes"] == []
    document = client.get_pipeline("p1")
    assert document.sha256 == entry["sha256"] and document.version == "1.0.0"
    assert json.loads(document.body)["name"] == "p1"
    assert client.get_pipeline("p1", etag=document.sha256) is None          # 304
    assert client.get_pipeline("p1", etag='"%s"' % document.sha256) is None
    with pytest.raises(NotFoundError):
        client.get_pipeline("missing")


def test_upload_results_gzip_accepted_duplicate_rejected(client, studio_server):
    answer = client.upload_results([result("r1"), result("r2"), {"run_id": "r3"}], "key-1")
    assert answer["accepted"] == ["r1", "r2"] and answer["duplicate"] == []
    assert answer["rejected"] == [{"index": 2, "run_id": "r3", "reason": "missing pipeline_id"}]
    assert studio_server.requests[-1]["content-encoding"] == "gzip"
    assert studio_server.requests[-1]["idempotency-key"] == "key-1"
    again = client.upload_results([result("r2"), result("r4")], "key-2")
    assert again["accepted"] == ["r4"] and again["duplicate"] == ["r2"]
    assert again["replayed"] is False


def test_an_empty_batch_sends_nothing(client, studio_server):
    assert client.upload_results([], "k")["accepted"] == []
    assert studio_server.requests == []


def test_model_manifest_and_full_download(client, model):
    manifest = client.model_manifest("m.gguf")
    assert manifest["size"] == len(model)
    dest = io.BytesIO()
    progress = []
    done = client.download_model("m.gguf", dest, chunk_cb=lambda n, total: progress.append(n))
    assert dest.getvalue() == model
    assert (done.start, done.written, done.total, done.restarted) == (0, len(model), len(model),
                                                                      False)
    assert progress[-1] == len(model)
    with pytest.raises(NotFoundError):
        client.model_manifest("nope")


# -- authentication ------------------------------------------------------------------------------

def test_a_wrong_key_is_an_auth_error_that_names_the_fix(studio_server):
    with client_for(studio_server.url, key="not-the-key") as cloud:
        with pytest.raises(AuthError) as caught:
            cloud.ping()
    err = caught.value
    assert err.exit_code == 5 and err.retryable is False and err.cloud_status == 401
    assert "api_key" in str(err) and DEVICE_ID in str(err)
    assert "fm-edge config set api_key" in str(err)
    assert "not-the-key" not in str(err)


def test_no_key_fails_without_calling_the_cloud(studio_server):
    with client_for(studio_server.url, key="") as cloud:
        with pytest.raises(AuthError):
            cloud.ping()
    assert studio_server.requests == []


def test_the_key_never_shows_in_repr(client):
    assert API_KEY not in repr(client)


# -- the link fails ------------------------------------------------------------------------------

def test_server_down_is_offline(tmp_path):
    server = start_studio(tmp_path)
    url = server.url
    server.stop()
    with client_for(url) as cloud:
        with pytest.raises(OfflineError) as caught:
            cloud.ping()
    assert caught.value.retryable is True and caught.value.exit_code == 3
    assert "Connection refused" in str(caught.value)
    assert caught.value.retry_after is None and caught.value.cloud_status is None


def test_a_body_cut_midway_is_offline(studio_server, chaos_proxy):
    push(studio_server, {"name": "big", "stages": [], "pad": "x" * 50000})
    chaos_proxy.set(cut_after=2000)
    with client_for(chaos_proxy.url) as cloud:
        with pytest.raises(OfflineError) as caught:
            cloud.get_pipeline("big")
    assert "connection broken" in str(caught.value)


def test_a_cut_json_reply_is_offline(studio_server, chaos_proxy):
    for n in range(30):
        push(studio_server, {"name": "p%d" % n, "stages": []})
    chaos_proxy.set(cut_after=400)
    with client_for(chaos_proxy.url) as cloud:
        with pytest.raises(OfflineError):
            cloud.pipeline_changes(0)


def test_a_silent_partition_times_out_as_offline(studio_server, chaos_proxy):
    chaos_proxy.set(blackhole=True)
    with client_for(chaos_proxy.url, read_timeout=0.3) as cloud:
        with pytest.raises(OfflineError) as caught:
            cloud.ping()
    assert "read_timeout" in str(caught.value)


def test_link_down_then_up(studio_server, chaos_proxy):
    with client_for(chaos_proxy.url) as cloud:
        assert cloud.ping()["ok"]
        chaos_proxy.link_down()
        with pytest.raises(OfflineError):
            cloud.ping()
        chaos_proxy.link_up()
        assert cloud.ping()["ok"]   # no backoff in the client: the next call just works


def test_a_lost_ack_is_absorbed_by_the_idempotency_key(studio_server, chaos_proxy):
    batch = [result("r1"), result("r2")]
    chaos_proxy.set(drop_response=True)
    with client_for(chaos_proxy.url) as cloud:
        with pytest.raises(OfflineError):
            cloud.upload_results(batch, "batch-1")
        assert len(studio_server.store.list_results()) == 2   # the cloud did commit
        chaos_proxy.clear()
        retried = cloud.upload_results(batch, "batch-1")
        fresh_key = cloud.upload_results(batch, "batch-2")
    assert retried["accepted"] == ["r1", "r2"] and retried["replayed"] is True
    assert fresh_key["duplicate"] == ["r1", "r2"]
    assert len(studio_server.store.list_results()) == 2


def test_a_request_cut_on_the_way_up_commits_nothing(studio_server, chaos_proxy):
    chaos_proxy.set(cut_request_after=300)
    big = [dict(result("r%d" % n), output=os.urandom(200).hex()) for n in range(20)]
    with client_for(chaos_proxy.url) as cloud:
        with pytest.raises(OfflineError):
            cloud.upload_results(big, "batch-1")
    assert studio_server.store.list_results() == []


def test_a_non_json_reply_is_offline(client, studio_server):
    studio_server.faults.garbage(path="/results")
    with pytest.raises(OfflineError) as caught:
        client.upload_results([result("r1")], "k")
    assert caught.value.code == "bad_response"


# -- the cloud says no ---------------------------------------------------------------------------

def test_503_with_retry_after_is_retryable_busy(client, studio_server):
    studio_server.faults.fail(503, retry_after=7, path="/results")
    with pytest.raises(BusyError) as caught:
        client.upload_results([result("r1")], "k")
    err = caught.value
    assert err.retryable is True and err.retry_after == 7.0 and err.cloud_status == 503
    assert studio_server.store.list_results() == []
    assert client.upload_results([result("r1")], "k")["accepted"] == ["r1"]


def test_429_is_busy_with_an_http_date_retry_after(client, studio_server):
    studio_server.faults.fail(429, retry_after="Wed, 21 Oct 2099 07:28:00 GMT")
    with pytest.raises(BusyError) as caught:
        client.ping()
    assert caught.value.code == "cloud_busy" and caught.value.retry_after > 0


@pytest.mark.parametrize("status", [500, 502])
def test_other_5xx_are_retryable_cloud_errors(client, studio_server, status):
    studio_server.faults.fail(status)
    with pytest.raises(FmEdgeError) as caught:
        client.ping()
    assert caught.value.retryable is True and caught.value.code == "cloud_error"
    assert not isinstance(caught.value, (OfflineError, AuthError))


def test_413_asks_for_a_smaller_batch(client, studio_server):
    studio_server.faults.fail(413, path="/results")
    with pytest.raises(UsageError) as caught:
        client.upload_results([result("r1")], "k")
    assert caught.value.code == "batch_too_large" and caught.value.retryable is False


def test_oversized_batches_are_refused_before_sending(client, studio_server):
    with pytest.raises(UsageError) as caught:
        client.upload_results([result("r%d" % n) for n in range(501)], "k")
    assert caught.value.code == "batch_too_large"
    noise = [dict(result("r%d" % n), output=os.urandom(4000).hex()) for n in range(300)]
    with pytest.raises(UsageError):
        client.upload_results(noise, "k")
    assert studio_server.requests == []


def test_a_reused_key_for_other_content_is_not_retryable(client):
    client.upload_results([result("r1")], "k")
    with pytest.raises(UsageError) as caught:
        client.upload_results([result("r2")], "k")
    assert caught.value.cloud_status == 422 and caught.value.retryable is False


@pytest.mark.parametrize("value, expected", [
    ("7", 7.0), (" 120 ", 120.0), ("Thu, 01 Jan 1970 00:01:40 GMT", 40.0),
    ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0), ("soon", None), (None, None), ("-5", None)])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=60.0) == expected


# -- model downloads ------------------------------------------------------------------------------

def test_download_resumes_after_a_cut(studio_server, chaos_proxy, model):
    dest = io.BytesIO()
    sha = hashlib.sha256(model).hexdigest()
    chaos_proxy.set(cut_after=100000)
    with client_for(chaos_proxy.url) as cloud:
        with pytest.raises(OfflineError):
            cloud.download_model("m.gguf", dest, expected_sha256=sha)
        kept = dest.tell()
        assert 0 < kept < len(model)
        chaos_proxy.clear()
        done = cloud.download_model("m.gguf", dest, offset=kept, expected_sha256=sha)
    assert dest.getvalue() == model
    assert (done.start, done.written, done.restarted) == (kept, len(model) - kept, False)
    assert studio_server.requests[-1]["range"] == "bytes=%d-" % kept


def test_a_200_to_a_range_request_restarts_instead_of_appending(client, studio_server, model):
    dest = io.BytesIO(b"stale bytes of an older file")
    dest.seek(0, io.SEEK_END)
    studio_server.faults.ignore_range = True
    done = client.download_model("m.gguf", dest, offset=dest.tell())
    assert dest.getvalue() == model and done.restarted is True


def test_a_changed_file_restarts_the_resume(client, model):
    dest = io.BytesIO(b"x" * 1000)
    dest.seek(0, io.SEEK_END)
    done = client.download_model("m.gguf", dest, offset=1000, expected_sha256="0" * 64)
    assert dest.getvalue() == model and done.restarted is True


def test_an_already_complete_file_downloads_nothing(client, model):
    dest = io.BytesIO(model)
    dest.seek(0, io.SEEK_END)
    done = client.download_model("m.gguf", dest, offset=len(model))
    assert (done.written, done.total) == (0, len(model)) and dest.getvalue() == model


def test_a_partial_longer_than_the_model_starts_over(client, model):
    dest = io.BytesIO(b"y" * (len(model) + 10))
    dest.seek(0, io.SEEK_END)
    done = client.download_model("m.gguf", dest, offset=len(model) + 10)
    assert dest.getvalue() == model and done.restarted is True


# -- configuration and TLS -----------------------------------------------------------------------

@pytest.mark.parametrize("url", ["", "studio.example.com", "ftp://x", "http://"])
def test_bad_cloud_urls_are_config_errors(url):
    with pytest.raises(ConfigError) as caught:
        CloudClient(url, API_KEY, DEVICE_ID)
    assert "cloud_url" in str(caught.value)


def test_bad_device_id_and_key_are_config_errors():
    with pytest.raises(ConfigError):
        CloudClient("http://127.0.0.1:1", API_KEY, "../x")
    with pytest.raises(ConfigError) as caught:
        CloudClient("http://127.0.0.1:1", "key with space", DEVICE_ID)
    assert "key with space" not in str(caught.value)


def test_a_missing_ca_bundle_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        CloudClient("https://127.0.0.1:1", API_KEY, DEVICE_ID, ca_bundle=str(tmp_path / "no.pem"))
    assert "ca_bundle" in str(caught.value)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError):
        CloudClient("https://127.0.0.1:1", API_KEY, DEVICE_ID, ca_bundle=str(tmp_path / "junk.pem"))


def test_a_pool_that_skips_verification_is_refused():
    # Built only to prove CloudClient refuses it ("NONE" = no certificate checks).
    unverified = urllib3.PoolManager(cert_reqs="NONE")
    with pytest.raises(ConfigError):
        CloudClient("https://127.0.0.1:1", API_KEY, DEVICE_ID, pool=unverified)
    verified = urllib3.PoolManager()
    CloudClient("https://127.0.0.1:1", API_KEY, DEVICE_ID, pool=verified).close()


@pytest.fixture
def tls_studio(tmp_path):
    tls = make_tls_files(tmp_path)
    server = start_studio(tmp_path, tls=tls)
    yield server, tls
    server.stop()


def test_tls_with_the_ca_bundle_works(tls_studio):
    server, tls = tls_studio
    assert server.url.startswith("https://")
    with client_for(server.url, ca_bundle=tls.ca_cert) as cloud:
        assert cloud.ping()["ok"] is True
        assert cloud.upload_results([result("r1")], "k")["accepted"] == ["r1"]


def test_tls_without_the_ca_bundle_names_the_fix_and_sends_nothing(tls_studio):
    server, _ = tls_studio
    with client_for(server.url) as cloud:
        with pytest.raises(OfflineError) as caught:
            cloud.upload_results([result("r1")], "k")
    err = caught.value
    assert err.code == "tls_error" and err.retryable is True
    assert "ca_bundle" in str(err) and "never turns verification off" in str(err)
    assert server.requests == [] and server.store.list_results() == []


def test_an_impostor_with_another_ca_gets_no_payload(tmp_path, tls_studio):
    server, _ = tls_studio
    other_ca = make_tls_files(tmp_path, prefix="other")
    with client_for(server.url, ca_bundle=other_ca.ca_cert) as cloud:
        with pytest.raises(OfflineError) as caught:
            cloud.upload_results([result("r1")], "k")
    assert "ca_bundle" in str(caught.value) and other_ca.ca_cert in str(caught.value)
    assert server.requests == []


def test_a_certificate_for_another_name_is_refused(tmp_path):
    tls = make_tls_files(tmp_path, names=("cloud.test",), prefix="named")
    server = start_studio(tmp_path, tls=tls, db_name="named.db")
    try:
        with client_for(server.url, ca_bundle=tls.ca_cert) as cloud:
            with pytest.raises(OfflineError) as caught:
                cloud.ping()
    finally:
        server.stop()
    assert caught.value.code == "tls_error"
    assert server.requests == []


def test_plain_http_to_a_tls_port_is_offline(tls_studio):
    server, _ = tls_studio
    with client_for(server.url.replace("https://", "http://"), read_timeout=5) as cloud:
        with pytest.raises(OfflineError):
            cloud.ping()


def test_https_to_a_plain_port_says_check_the_scheme(studio_server):
    with client_for(studio_server.url.replace("http://", "https://"), read_timeout=5) as cloud:
        with pytest.raises(OfflineError) as caught:
            cloud.ping()
    assert caught.value.code == "tls_error" and "scheme" in str(caught.value)


def test_a_certificate_not_valid_yet_points_at_the_clock(tmp_path):
    tls = make_tls_files(tmp_path, prefix="future", starts_in_days=30)
    server = start_studio(tmp_path, tls=tls)
    try:
        with client_for(server.url, ca_bundle=tls.ca_cert) as cloud:
            with pytest.raises(OfflineError) as caught:
                cloud.ping()
    finally:
        server.stop()
    assert "not yet valid" in str(caught.value) and "clock" in str(caught.value)


# -- the chaos proxy itself ----------------------------------------------------------------------

def test_proxy_reset_probability_one_resets_every_connection(studio_server, chaos_proxy):
    chaos_proxy.set(reset_p=1)
    with client_for(chaos_proxy.url) as cloud:
        with pytest.raises(OfflineError):
            cloud.ping()
    assert chaos_proxy.stats["resets"] == 1 and studio_server.requests == []


def test_proxy_latency_still_delivers(studio_server, chaos_proxy):
    chaos_proxy.set(latency_ms=20)
    with client_for(chaos_proxy.url) as cloud:
        assert cloud.ping()["ok"] is True
    assert chaos_proxy.stats["bytes_down"] > 0


def test_proxy_refuses_unknown_settings(chaos_proxy):
    with pytest.raises(ValueError):
        chaos_proxy.set(jitter=3)
    with pytest.raises(ValueError):
        chaos_proxy.set(reset_p=2)


def test_proxy_command_line_toggles_the_link_with_sigusr1(studio_server):
    proxy_script = STUDIO_SCRIPT.replace("studio.py", "chaosproxy.py")
    proc = subprocess.Popen([sys.executable, proxy_script, "0", "127.0.0.1",
                             str(port_of(studio_server.url))], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:", 1)[1].split()[0])
        with client_for("http://127.0.0.1:%d" % port) as cloud:
            assert cloud.ping()["ok"] is True
            proc.send_signal(signal.SIGUSR1)
            assert "link down" in proc.stdout.readline()
            with pytest.raises(OfflineError):
                cloud.ping()
            proc.send_signal(signal.SIGUSR1)
            assert "link up" in proc.stdout.readline()
            assert wait_until(lambda: _pings(cloud), what="the link to come back")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
    assert proc.returncode == 0


def _pings(cloud):
    try:
        return cloud.ping()["ok"]
    except OfflineError:
        return False
