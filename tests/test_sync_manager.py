"""SyncManager against a real studio on 127.0.0.1: the seed's API, results up, pipelines
down, registration and heartbeats, status and its callbacks, a refused api_key.

The schedule is driven with ``step()`` and a fake clock (or a fake ``sleep`` that moves
it), so an hour of backoff takes milliseconds and nothing waits on real time.
"""

import asyncio
import json
import logging
import os
import random

import pytest

from clock import FakeClock
from seed import adapt, example, run_example
from studio_fixture import API_KEY, start_proxy, start_studio, wait_until
from fmedge.config import EdgeConfig
from fmedge.errors import ConfigError
from fmedge.runtime import EdgeRuntime
from fmedge.sync.backoff import Backoff, MAX_RETRY_AFTER_S
from fmedge.sync.lock import SyncLock
from fmedge.sync.manager import SyncManager, SyncStatus
from fmedge.sync.once import STATE_FILE_NAME, SyncState, batch_key

GOOD = {"name": "greet", "version": "1", "stages": [{"id": "a", "type": "logger"}]}
BAD = {"name": "greet", "version": "2", "stages": [{"id": "a", "type": "no-such-type"}]}


@pytest.fixture
def studio(tmp_path):
    server = start_studio(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def runtime(tmp_path, studio):
    rt = EdgeRuntime(EdgeConfig(data_dir=str(tmp_path / "edge"), cloud_url=studio.url,
                                api_key=API_KEY))
    yield rt
    rt.close()


def produce(rt, count, start=0, **extra):
    ids = ["run-%05d" % i for i in range(start, start + count)]
    for run_id in ids:
        rt.results.save_now(run_id, dict({"pipeline_id": "p", "status": "completed",
                                          "output": {"run": run_id}}, **extra))
    return ids


def manager_for(rt, clock=None, **kwargs):
    clock = clock or FakeClock()
    return SyncManager.for_runtime(rt, clock=clock, rng=random.Random(1), **kwargs)


def push(studio, document, pipeline_id="greet"):
    return studio.store.push_pipeline(json.dumps(document).encode(), pipeline_id)


def cloud_ids(studio):
    return [row["run_id"] for row in studio.store.list_results()]


def requests_to(studio, suffix):
    return [r for r in studio.requests if r["path"].endswith(suffix)]


async def drive(manager, clock, until, max_steps=500):
    """Step the schedule, moving the fake clock over each wait, until ``until()``."""
    for _ in range(max_steps):
        delay = await manager.step()
        if until():
            return
        clock.advance(delay)
    raise AssertionError("sync did not get there in %d steps" % max_steps)


# -- the seed's example ------------------------------------------------------------------------

def test_seed_example_runs_against_the_studio(tmp_path, studio, monkeypatch, capsys):
    monkeypatch.setenv("FLOWMASON_EDGE_DATA_DIR", str(tmp_path / "device"))
    device = EdgeRuntime(EdgeConfig.load())
    produced = produce(device, 7)
    push(studio, GOOD)
    code = adapt(example("SyncManager"), tmp_path, cloud_url=studio.url)
    names = run_example(code.replace("your-api-key", API_KEY))
    assert names["status"] is SyncStatus.OFFLINE        # nothing contacted before the calls
    assert sorted(cloud_ids(studio)) == produced
    assert device.results.stats()["pending"] == 0
    assert device.pipelines.entry("greet")["source"] == "cloud"
    assert names["sync"].status is SyncStatus.ONLINE
    device.close()


def test_status_prints_as_a_plain_word():
    assert str(SyncStatus.ONLINE) == "online"
    assert f"Status: {SyncStatus.OFFLINE}" == "Status: offline"
    assert SyncStatus("error") is SyncStatus.ERROR


def test_callbacks_fire_online_offline_online_with_the_link(runtime, studio):
    proxy = start_proxy(studio.server_address[1])
    clock = FakeClock()

    async def fake_sleep(seconds):   # virtual time: the loop runs its schedule at once
        clock.advance(seconds)
        await asyncio.sleep(0.002)

    seen, awaited = [], []

    async def coroutine_callback(status):
        awaited.append(status)

    async def scenario():
        config = runtime.config.with_overrides(cloud_url=proxy.url)
        sync = SyncManager(config=config, results=runtime.results,
                           pipelines=runtime.pipelines, clock=clock, sleep=fake_sleep,
                           rng=random.Random(3))
        sync.on_status_change = seen.append
        await sync.start()
        await until_async(lambda: SyncStatus.ONLINE in seen)
        proxy.link_down()
        await until_async(lambda: seen[-1] is SyncStatus.OFFLINE)
        offline_since = sync.offline_since
        sync.on_status_change = coroutine_callback
        proxy.link_up()
        await until_async(lambda: SyncStatus.ONLINE in awaited)
        await sync.stop()
        return offline_since

    try:
        offline_since = asyncio.run(scenario())
    finally:
        proxy.stop()
    changes = [s for s in seen + awaited if s is not SyncStatus.SYNCING]
    assert changes[:3] == [SyncStatus.ONLINE, SyncStatus.OFFLINE, SyncStatus.ONLINE]
    assert all(a is not b for a, b in zip(seen + awaited, (seen + awaited)[1:]))  # once each
    assert offline_since is not None


async def until_async(predicate, timeout=20.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for a sync status")
        await asyncio.sleep(0.005)


def test_constructing_makes_no_network_calls_and_opens_nothing(tmp_path, studio):
    config = EdgeConfig(data_dir=str(tmp_path / "fresh"), cloud_url=studio.url,
                        api_key=API_KEY)
    sync = SyncManager(config=config)
    assert sync.status is SyncStatus.OFFLINE and sync.uploaded == 0
    assert studio.requests == []
    assert not os.path.exists(config.data_dir)
    assert "test-key" not in repr(sync)


def test_arguments_override_the_config_and_are_checked(tmp_path):
    config = EdgeConfig(data_dir=str(tmp_path), sync_interval=120)
    sync = SyncManager("http://127.0.0.1:9", "k", ping_interval=15, config=config)
    assert (sync.sync_interval, sync.ping_interval) == (120, 15)
    with pytest.raises(ConfigError, match="sync_interval"):
        SyncManager("http://127.0.0.1:9", "k", sync_interval=0, config=config)


def test_start_without_cloud_url_says_what_to_set(tmp_path):
    sync = SyncManager(config=EdgeConfig(data_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="config set cloud_url"):
        asyncio.run(sync.start())


# -- results -----------------------------------------------------------------------------------

def test_results_go_oldest_first_in_batches_of_at_most_500(runtime, studio):
    produced = produce(runtime, 1203)
    report = asyncio.run(manager_for(runtime).sync_results())
    assert report["ok"] and report["counters"]["uploaded"] == 1203
    posts = requests_to(studio, "/results")
    assert len(posts) == 3
    assert cloud_ids(studio) == produced          # received in run order
    assert runtime.results.stats()["synced"] == 1203


def test_batch_key_depends_only_on_the_rows(runtime):
    produce(runtime, 3)
    rows = runtime.results.pending_now(10)
    for row in rows:
        row.pop("_seq")
    texts = [(r, json.dumps(r, separators=(",", ":"))) for r in rows]
    assert batch_key(texts) == batch_key(list(texts))
    assert batch_key(texts) != batch_key(texts[:2])
    changed = [(dict(texts[0][0], output=1), "{}")] + texts[1:]
    assert batch_key(changed) != batch_key(texts)


def test_a_resend_after_a_lost_answer_reuses_the_key(runtime, studio):
    produced = produce(runtime, 5)
    studio.faults.drop_after_commit(times=1, path="/results")
    sync = manager_for(runtime)
    first = asyncio.run(sync.sync_results())
    assert not first["ok"] and runtime.results.stats()["pending"] == 5
    second = asyncio.run(sync.sync_results())
    assert second["ok"] and sync.duplicate == 5 and sync.uploaded == 0
    keys = [r["idempotency-key"] for r in requests_to(studio, "/results")]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert sorted(cloud_ids(studio)) == produced
    assert runtime.results.stats()["synced"] == 5


def test_rejected_results_are_quarantined_and_never_block(runtime, studio):
    produced = produce(runtime, 20)
    studio.faults.poison.update({"run-00003", "run-00011"})
    sync = manager_for(runtime, batch_size=5)
    assert asyncio.run(sync.sync_results())["ok"]
    assert sync.rejected == 2 and sync.uploaded == 18
    assert runtime.results.get_now("run-00003")["sync_state"] == "quarantined"
    assert "poison" in runtime.results.get_now("run-00011")["sync_error"]
    assert sorted(cloud_ids(studio)) == sorted(set(produced) - {"run-00003", "run-00011"})
    assert asyncio.run(sync.sync_results())["counters"]["rejected"] == 0   # not resent


def test_results_that_cannot_be_sent_are_quarantined_locally(runtime, studio):
    produce(runtime, 2)
    runtime.results.save_now("run-nan", {"pipeline_id": "p", "status": "completed",
                                         "output": float("nan")})
    noise = os.urandom(900 * 1024).hex()          # ~1.8 MB of text, ~1 MB+ of gzip
    runtime.results.save_now("run-huge", {"pipeline_id": "p", "status": "failed",
                                          "output": noise})
    produce(runtime, 2, start=2)
    sync = manager_for(runtime)
    assert asyncio.run(sync.sync_results())["ok"]
    assert sync.quarantined_locally == 2 and sync.uploaded == 4
    assert "JSON" in runtime.results.get_now("run-nan")["sync_error"]
    assert "size limit" in runtime.results.get_now("run-huge")["sync_error"]


def test_a_batch_over_1_mib_of_gzip_is_split(runtime, studio):
    for i in range(6):   # 2.4 MB of hex text: one batch by bytes, ~1.2 MB once gzipped
        runtime.results.save_now("big-%d" % i, {"pipeline_id": "p", "status": "completed",
                                                "output": os.urandom(200 * 1024).hex()})
    sync = manager_for(runtime)
    assert asyncio.run(sync.sync_results())["ok"]
    assert sync.uploaded == 6 and sync.batches >= 2
    assert len(cloud_ids(studio)) == 6


# -- pipelines ---------------------------------------------------------------------------------

def test_pipelines_are_installed_updated_and_their_cursor_kept(runtime, studio):
    push(studio, GOOD)
    sync = manager_for(runtime)
    assert asyncio.run(sync.sync_pipelines())["ok"]
    entry = runtime.pipelines.entry("greet")
    assert (entry["version"], entry["source"]) == ("1", "cloud")
    push(studio, dict(GOOD, version="2", description="v2"))
    assert asyncio.run(sync.sync_pipelines())["ok"]
    assert runtime.pipelines.entry("greet")["version"] == "2"
    state = SyncState.load(runtime.pipelines.cache_dir)
    assert state.cursor == studio.store.latest_seq()
    listed = [r["path"] for r in studio.requests if "/pipelines" in r["path"]]
    assert listed.count("/api/v1/edge/pipelines/greet") == 2
    asyncio.run(sync.sync_pipelines())    # nothing changed: only the feed is read
    assert [r["path"] for r in studio.requests][-1] == "/api/v1/edge/pipelines"
    assert sync.pipelines_updated == 2


def test_an_invalid_update_never_replaces_a_working_pipeline(runtime, studio, caplog):
    push(studio, GOOD)
    sync = manager_for(runtime)
    asyncio.run(sync.sync_pipelines())
    push(studio, BAD)
    with caplog.at_level(logging.WARNING, logger="fmedge.sync"):
        report = asyncio.run(sync.sync_pipelines())
    assert report["ok"] and sync.pipelines_refused == 1
    entry = runtime.pipelines.entry("greet")
    assert entry["version"] == "1" and runtime.pipelines.get_now("greet") == GOOD
    assert "no-such-type" in caplog.text and "version 1 keeps running" in caplog.text
    refused = SyncState.load(runtime.pipelines.cache_dir).refused["greet"]
    assert refused["version"] == "2" and "no-such-type" in refused["reason"]


@pytest.mark.parametrize("body", [b'{"name": "x", "stages": [', b'{"a": 1, "a": 2}',
                                  b'{"stages": NaN}', b"\xff\xfe", b"[1, 2]"])
def test_broken_documents_from_the_cloud_are_refused(runtime, studio, body):
    push(studio, GOOD)
    sync = manager_for(runtime)
    asyncio.run(sync.sync_pipelines())
    with studio.store._transaction() as conn:   # what a broken studio could serve
        seq = conn.execute("SELECT MAX(seq) + 1 FROM pipelines").fetchone()[0]
        conn.execute("UPDATE pipelines SET document = ?, sha256 = ?, seq = ? WHERE id = ?",
                     (body, __import__("hashlib").sha256(body).hexdigest(), seq, "greet"))
    assert asyncio.run(sync.sync_pipelines())["ok"]
    assert sync.pipelines_refused == 1
    assert runtime.pipelines.get_now("greet") == GOOD


def test_deletions_remove_cloud_pipelines_but_never_local_ones(runtime, studio):
    push(studio, GOOD)
    push(studio, dict(GOOD, name="mine"), "mine")
    runtime.pipelines.store_now("mine", dict(GOOD, name="mine", version="local-1"),
                                source="local")
    sync = manager_for(runtime)
    asyncio.run(sync.sync_pipelines())
    assert runtime.pipelines.entry("mine")["version"] == "local-1"      # not overwritten
    assert sync.pipelines_kept_local == 1
    studio.store.delete_pipeline("greet")
    studio.store.delete_pipeline("mine")
    asyncio.run(sync.sync_pipelines())
    assert runtime.pipelines.entry("greet") is None
    assert runtime.pipelines.entry("mine")["source"] == "local"
    assert sync.pipelines_deleted == 1


def test_etag_304_when_the_feed_is_read_again(runtime, studio):
    push(studio, GOOD)
    sync = manager_for(runtime)
    asyncio.run(sync.sync_pipelines())
    state = SyncState.load(runtime.pipelines.cache_dir)
    state.cursor = 0                   # e.g. after an unpin, or a feed reset
    state.save()
    asyncio.run(sync.sync_pipelines())
    last = requests_to(studio, "/pipelines/greet")[-1]
    assert last["status"] == 304 and last["if-none-match"].strip('"') == \
        studio.store.get_pipeline("greet")["sha256"]
    assert sync.pipelines_unchanged == 1 and sync.pipelines_updated == 1


def test_pinned_pipelines_keep_their_version(runtime, studio):
    from fmedge.sync.once import pin_pipeline, unpin_pipeline

    push(studio, GOOD)
    sync = manager_for(runtime)
    asyncio.run(sync.sync_pipelines())
    assert pin_pipeline(runtime, "greet") == "1"
    push(studio, dict(GOOD, version="2"))
    asyncio.run(sync.sync_pipelines())
    assert runtime.pipelines.entry("greet")["version"] == "1" and sync.pipelines_pinned == 1
    studio.store.delete_pipeline("greet")
    asyncio.run(sync.sync_pipelines())
    assert runtime.pipelines.entry("greet")["version"] == "1"
    assert unpin_pipeline(runtime, "greet")
    asyncio.run(sync.sync_pipelines())
    assert runtime.pipelines.entry("greet") is None


def test_a_damaged_state_file_is_set_aside(runtime, studio):
    push(studio, GOOD)
    path = os.path.join(runtime.pipelines.cache_dir, STATE_FILE_NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("{not json")
    assert asyncio.run(manager_for(runtime).sync_pipelines())["ok"]
    assert any(name.startswith(STATE_FILE_NAME + ".corrupt-")
               for name in os.listdir(os.path.dirname(path)))
    assert runtime.pipelines.entry("greet") is not None


# -- registration, heartbeat -------------------------------------------------------------------

def test_register_once_then_again_when_the_cloud_forgets(runtime, studio):
    produce(runtime, 3)
    push(studio, GOOD)
    sync = manager_for(runtime)
    assert asyncio.run(sync.sync_now())["ok"]
    [device] = studio.store.list_devices()
    beat = device["heartbeat"]
    assert beat["queue_depth"] == 0 and beat["pipelines"] == {"greet": "1"}
    assert beat["disk_free_bytes"] > 0 and beat["version"] == device["version"]
    asyncio.run(sync.sync_now())
    assert len(requests_to(studio, "/devices/register")) == 1
    with studio.store._transaction() as conn:
        conn.execute("DELETE FROM devices")
    assert asyncio.run(sync.sync_now())["ok"]
    assert len(requests_to(studio, "/devices/register")) == 2
    assert studio.store.list_devices()[0]["heartbeat"] is not None


# -- status, backoff, a bad key ----------------------------------------------------------------

def test_bad_api_key_one_error_line_and_no_retry_storm(tmp_path, studio, caplog):
    rt = EdgeRuntime(EdgeConfig(data_dir=str(tmp_path / "edge"), cloud_url=studio.url,
                                api_key="wrong-key"))
    produce(rt, 10)
    clock = FakeClock()
    sync = manager_for(rt, clock)
    hour = clock.now + 3600

    async def an_hour():
        while clock.now < hour:
            clock.advance(await sync.step())
    with caplog.at_level(logging.INFO, logger="fmedge.sync"):
        asyncio.run(an_hour())
    assert sync.status is SyncStatus.ERROR
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "api_key" in errors[0].getMessage()
    assert "config set api_key" in errors[0].getMessage()
    # At most one ping per ping_interval plus a pass per 300 s cap: ~120 + 12.
    assert len(studio.requests) <= 3600 / 30 + 3600 / 300 + 2
    assert rt.results.stats()["pending"] == 10
    rt.close()


def test_a_fixed_key_is_noticed_at_the_next_ping(tmp_path, studio):
    config = EdgeConfig(data_dir=str(tmp_path / "edge"), cloud_url=studio.url,
                        api_key="wrong-key")
    rt = EdgeRuntime(config)
    produce(rt, 4)
    clock = FakeClock()
    sync = manager_for(rt, clock)
    asyncio.run(drive(sync, clock, lambda: sync.status is SyncStatus.ERROR))
    studio.api_key = "wrong-key"           # the operator fixes the key on the cloud side
    fixed_at = clock.now
    asyncio.run(drive(sync, clock, lambda: sync.uploaded == 4))
    assert clock.now - fixed_at <= sync.ping_interval
    assert sync.status is SyncStatus.ONLINE
    rt.close()


def test_backoff_full_jitter_between_1_s_and_300_s():
    backoff = Backoff(rng=random.Random(5))
    delays = [backoff.next_delay() for _ in range(40)]
    assert delays[0] == 1.0
    assert all(1.0 <= d <= 300.0 for d in delays)
    assert max(delays[20:]) > 100 and len(set(delays[20:])) == 20   # jittered at the cap
    assert backoff.next_delay(retry_after=400) >= 400
    assert backoff.next_delay(retry_after=10 ** 9) == MAX_RETRY_AFTER_S
    backoff.reset()
    assert backoff.next_delay() == 1.0
    assert backoff.max_out() == 300.0 and backoff.ceiling() == 300.0


def test_a_pass_waits_for_the_sync_lock_and_reports_busy(runtime, studio):
    produce(runtime, 2)
    holder = SyncLock(runtime.config.data_dir)
    assert holder.acquire()
    try:
        report = asyncio.run(manager_for(runtime, wait_lock_s=0.05).sync_results())
    finally:
        holder.release()
    assert not report["ok"] and report["error_code"] == "busy"
    assert str(os.getpid()) in report["error"]
    assert requests_to(studio, "/results") == []
    assert asyncio.run(manager_for(runtime).sync_results())["ok"]


def test_stop_waits_for_the_loop_and_closes_what_it_opened(tmp_path, studio, monkeypatch):
    monkeypatch.setenv("FLOWMASON_EDGE_DATA_DIR", str(tmp_path / "own"))
    clock = FakeClock()

    async def fake_sleep(seconds):
        clock.advance(seconds)
        await asyncio.sleep(0.002)

    async def scenario():
        sync = SyncManager(cloud_url=studio.url, api_key=API_KEY, clock=clock,
                           sleep=fake_sleep)
        await sync.start()
        await until_async(lambda: sync.last_sync_at is not None)
        await sync.stop()
        assert not sync.running and sync._sync is None
        return sync
    sync = asyncio.run(scenario())
    assert sync.status is SyncStatus.ONLINE
    wait_until(lambda: studio.store.list_devices(), what="the device registered")


def test_a_config_problem_is_an_error_status_not_a_crash(tmp_path, studio, caplog):
    config = EdgeConfig(data_dir=str(tmp_path / "edge"), cloud_url=studio.url,
                        api_key=API_KEY, ca_bundle=str(tmp_path / "missing.pem"))
    clock = FakeClock()
    sync = SyncManager(config=config, clock=clock, rng=random.Random(2))

    async def a_while():
        for _ in range(5):
            clock.advance(await sync.step())
    with caplog.at_level(logging.INFO, logger="fmedge.sync"):
        asyncio.run(a_while())
    assert sync.status is SyncStatus.ERROR and "ca_bundle" in str(sync.last_error)
    assert "Traceback" not in caplog.text and len(caplog.records) == 1
    assert studio.requests == []
