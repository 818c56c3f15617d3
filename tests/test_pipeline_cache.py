"""PipelineCache: storage, versions and rollback, LRU and TTL eviction, id validation."""

import json

import pytest

from fmedge.cache import PipelineCache
from fmedge.errors import InvalidIdError, PipelineValidationError, UsageError
from clock import FakeClock


def doc(name="p", size=0, version=None):
    document = {"name": name, "stages": [{"id": "s1", "type": "logger",
                                          "config": {"pad": "x" * size}}]}
    if version:
        document["version"] = version
    return document


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(tmp_path, clock):
    store = PipelineCache(str(tmp_path / "pipelines"), max_size_mb=1, ttl_days=30,
                          clock=clock)
    yield store
    store.close()


def test_store_get_exists_list_remove(cache):
    entry = cache.store_now("alpha", doc("a", version="1.2.0"))
    assert entry["version"] == "1.2.0" and entry["source"] == "local"
    assert len(entry["sha256"]) == 64 and entry["size"] > 0
    assert cache.get_now("alpha") == doc("a", version="1.2.0")
    assert cache.exists_now("alpha") and not cache.exists_now("beta")
    assert cache.get_now("beta") is None
    assert [e["id"] for e in cache.list_now()] == ["alpha"]
    assert cache.remove_now("alpha") is True and cache.remove_now("alpha") is False
    assert cache.list_now() == []


def test_survives_reopen(tmp_path, clock):
    first = PipelineCache(str(tmp_path), clock=clock)
    first.store_now("kept", doc(), source="cloud", version="7")
    first.close()
    again = PipelineCache(str(tmp_path), clock=clock)
    assert again.entry("kept")["version"] == "7" and again.get_now("kept") == doc()


def test_previous_version_kept_and_rollback(cache):
    cache.store_now("p", doc("v1"), version="1")
    cache.store_now("p", doc("v2"), version="2")
    entry = cache.entry("p")
    assert (entry["version"], entry["previous_version"]) == ("2", "1")
    rolled = cache.rollback_now("p")
    assert rolled["version"] == "1" and cache.get_now("p") == doc("v1")
    assert rolled["previous_version"] == "2"
    with pytest.raises(UsageError, match="no previous version"):
        cache.rollback_now("other") if cache.store_now("other", doc()) else None


def test_same_document_twice_keeps_one_version(cache):
    cache.store_now("p", doc("v1"), version="1")
    cache.store_now("p", doc("v1"), version="1")
    assert cache.entry("p")["previous_version"] is None


def test_store_accepts_json_text_and_refuses_bad_documents(cache):
    cache.store_now("text", json.dumps(doc()))
    assert cache.get_now("text") == doc()
    for bad, words in [("{oops", "not valid JSON"), ([1, 2], "JSON object"),
                       ({"stages": []}, "'stages'"), ({"name": "x"}, "'stages'")]:
        with pytest.raises(PipelineValidationError) as info:
            cache.store_now("bad", bad)
        assert "pipeline bad" in str(info.value) and words in str(info.value)
    assert not cache.exists_now("bad")


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "a\\b", "a\x00b", "x" * 129, "", ".hidden",
                                    "..", "a..b", "sp ace"])
def test_ids_are_validated(cache, bad_id):
    with pytest.raises(InvalidIdError):
        cache.store_now(bad_id, doc())
    with pytest.raises(InvalidIdError):
        cache.get_now(bad_id)


def test_ttl_counts_from_last_use_and_spares_local(cache, clock):
    cache.store_now("cloud-used", doc(), source="cloud")
    cache.store_now("cloud-idle", doc(), source="cloud")
    cache.store_now("local-idle", doc(), source="local")
    clock.advance(days=20)
    cache.get_now("cloud-used")             # a run counts as a use
    clock.advance(days=15)                  # idle ones now 35 days old, used one 15
    assert cache.cleanup_now() == ["cloud-idle"]
    assert cache.exists_now("cloud-used") and cache.exists_now("local-idle")


def test_size_cap_evicts_least_recently_used_cloud_first(cache, clock):
    quarter = 250 * 1024                     # four fit under the 1 MB cap, five do not
    for name in ("a", "b", "c"):
        cache.store_now(name, doc(size=quarter), source="cloud")
        clock.advance(seconds=120)
    cache.store_now("mine", doc(size=quarter), source="local")
    clock.advance(seconds=120)
    cache.get_now("a")                      # a is now the most recently used
    clock.advance(seconds=120)
    cache.store_now("d", doc(size=quarter), source="cloud")
    remaining = {e["id"] for e in cache.list_now()}
    assert "b" not in remaining             # the least recently used cloud pipeline
    assert {"a", "c", "d", "mine"} <= remaining
    assert cache.total_bytes() <= 1024 * 1024


def test_a_pipeline_larger_than_the_cap_is_not_evicted_by_its_own_store(tmp_path, clock):
    cache = PipelineCache(str(tmp_path), max_size_mb=0.01, clock=clock)
    cache.store_now("big", doc(size=20000), source="cloud")
    assert cache.exists_now("big")


def test_seed_async_api(tmp_path):
    import asyncio

    async def scenario():
        cache = PipelineCache(cache_dir=str(tmp_path), max_size_mb=100, ttl_days=30)
        await cache.store("my-pipeline", doc())
        assert await cache.get("my-pipeline") == doc()
        assert await cache.exists("my-pipeline") is True
        assert await cache.cleanup() == []
        assert [e["id"] for e in await cache.list()] == ["my-pipeline"]
        assert await cache.remove("my-pipeline") is True
    asyncio.run(scenario())


def test_documents_are_served_from_memory_yet_every_change_shows(tmp_path, monkeypatch):
    import fmedge.cache.pipelines as module

    ours = PipelineCache(str(tmp_path))
    theirs = PipelineCache(str(tmp_path))      # its own connection, as another process
    monkeypatch.setattr(module, "_RECHECK_S", 3600.0)
    ours.store_now("p", doc(version="1"))
    copy = ours.get_now("p")
    copy["stages"].clear()                     # a fresh copy each time: changing it ...
    assert ours.get_now("p")["version"] == "1" and ours.get_now("p")["stages"]   # ... not
    theirs.store_now("p", doc(version="2"))
    assert ours.get_now("p")["version"] == "1"    # served from memory until the recheck
    ours.store_now("p", doc(version="3"))         # this process's own change: at once
    assert ours.get_now("p")["version"] == "3"
    monkeypatch.setattr(module, "_RECHECK_S", 0.0)
    ours.store_now("other", doc(name="other"))    # any own write: read again, ...
    ours.get_now("p")                             # ... remembered with a recheck of now
    theirs.store_now("p", doc(version="4"))
    assert ours.get_now("p")["version"] == "4"    # the other process's change, rechecked
    theirs.remove_now("p")
    assert ours.get_now("p") is None
    theirs.store_now("q", doc(name="q"))          # what is missing is never remembered
    assert ours.get_now("q") is not None
