"""ModelCache: downloads from the studio and from URLs (resume, stall, corruption, free
space), imports from a path, LRU eviction around models in use, remove/clear, the Ollama
backend path, and the functions the CLI calls."""

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fmedge.cache.download import (FLUSH_EVERY, HASH_CHUNK, ChecksumMismatchError,
                                   HashingFile, Partial, _Flusher)
from fmedge.cache.models import (ModelCache, add_model, clear_models, list_models,
                                 pull_model, remove_model)
from fmedge.config import EdgeConfig
from fmedge.errors import (BusyError, InvalidIdError, NotFoundError, OfflineError,
                           StorageError, UsageError)
from fmedge.progress import ProgressBar, terminal_progress
from fsfixtures import can_mount, tmpfs
from peers import start_standin
from studio_fixture import API_KEY, DEVICE_ID, REPO, start_proxy, start_studio, wait_until
from fmedge.sync.client import CloudClient

MB = 1024 * 1024


def gguf_bytes(size, seed=0):
    """``size`` bytes that start like a GGUF file (the cache refuses anything else)."""
    body = random.Random(seed).getrandbits(8 * (size - 4)).to_bytes(size - 4, "little")
    return b"GGUF" + body


def write(path, data):
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def studio(tmp_path):
    server = start_studio(tmp_path)
    yield server
    server.stop()


def publish(server, tmp_path, name, data):
    server.store.add_model(name, write(tmp_path / ("%s.src" % name), data))
    return data


def file_requests(server, name):
    return [r for r in server.requests if r["path"].endswith("/models/%s/file" % name)]


def make_cache(tmp_path, url, sleeps=None, **kwargs):
    client = CloudClient(url, API_KEY, DEVICE_ID, read_timeout=kwargs.pop("stall", 10))
    sleeps = [] if sleeps is None else sleeps
    kwargs.setdefault("min_free_bytes", 0)
    return ModelCache(str(tmp_path / "models"), cloud=client, sleep=sleeps.append,
                      rng=random.Random(7), **kwargs)


def leftovers(cache_dir, name):
    return sorted(f for f in os.listdir(cache_dir) if f.startswith(name))


# -- a plain file server with Range support, for URL downloads ---------------------------------

class FileServer(ThreadingHTTPServer):
    """Serves one byte string at any path, honouring ``Range``; can stall once mid-body."""

    daemon_threads = True

    def __init__(self, data):
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.data = data
        self.etag = '"v1"'
        self.stall_after = None         # bytes sent before the first answer goes silent
        self.release = threading.Event()
        self.ranges = []
        self.sent = 0
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/models/tiny.gguf" % self.server_address[1]

    def stop(self):
        self.release.set()
        self.shutdown()
        self.server_close()


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        data, server = self.server.data, self.server
        wanted = self.headers.get("Range")
        server.ranges.append(wanted)
        start = 0
        if wanted and self.headers.get("If-Range", server.etag) == server.etag:
            start = int(wanted.split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1,
                                                                  len(data)))
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", server.etag)
        self.end_headers()
        body = data[start:]
        if server.stall_after is not None:
            cut, server.stall_after = server.stall_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            server.sent += cut
            server.release.wait(30)     # silent: the client's stall timeout must fire
            self.close_connection = True
            return
        self.wfile.write(body)
        server.sent += len(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    server = FileServer(gguf_bytes(MB, seed=3))
    yield server
    server.stop()


# -- downloads from the cloud -------------------------------------------------------------------

def test_ensure_model_downloads_verifies_and_then_stays_offline(studio, tmp_path):
    data = publish(studio, tmp_path, "tiny", gguf_bytes(300 * 1024))
    cache = make_cache(tmp_path, studio.url)
    seen = []
    path = asyncio.run(cache.ensure_model("tiny", progress=lambda d, t: seen.append((d, t))))
    assert path == cache.get_model_path("tiny") == str(tmp_path / "models" / "tiny.gguf")
    with open(path, "rb") as handle:
        assert handle.read() == data
    assert seen[-1] == (len(data), len(data))
    [entry] = cache.list()
    assert (entry["name"], entry["size"], entry["sha256"], entry["in_use"]) == (
        "tiny", len(data), sha(data), False)
    assert leftovers(cache.cache_dir, "tiny") == ["tiny.gguf"]
    before = len(studio.requests)
    assert asyncio.run(cache.ensure_model("tiny")) == path     # cached: no network at all
    assert len(studio.requests) == before


def test_a_download_cut_three_times_resumes_without_refetching(studio, tmp_path):
    data = publish(studio, tmp_path, "tiny", gguf_bytes(2 * MB))
    proxy = start_proxy(studio.server_address[1], cut_after=int(len(data) * 0.3))
    try:
        sleeps = []
        report = make_cache(tmp_path, proxy.url, sleeps).pull("tiny")
        stats = dict(proxy.stats)
    finally:
        proxy.stop()
    assert stats["cuts"] == 3 and report["attempts"] == 4 and len(sleeps) == 3
    assert report["sha256"] == sha(data) and report["fetched_bytes"] <= 1.2 * len(data)
    assert stats["bytes_down"] <= 1.2 * len(data)       # counted on the wire
    ranges = [r["range"] for r in file_requests(studio, "tiny")]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])


def test_failures_without_progress_back_off_exponentially_and_honour_retry_after(studio,
                                                                                tmp_path):
    data = publish(studio, tmp_path, "tiny", gguf_bytes(100 * 1024))
    studio.faults.fail(503, times=3, path="/file")
    studio.faults.fail(503, times=1, retry_after=7, path="/file")
    sleeps = []
    report = make_cache(tmp_path, studio.url, sleeps).pull("tiny")
    assert report["attempts"] == 5 and report["sha256"] == sha(data)
    # Full jitter between the base (1 s) and a ceiling that doubles: 1, 2, 4 s...
    assert [1 <= delay <= 2 ** n for n, delay in enumerate(sleeps[:3])] == [True] * 3
    assert sleeps[3] >= 7                               # the cloud's Retry-After wins


def test_a_link_that_stays_down_gives_up_with_a_clear_error(studio, tmp_path):
    publish(studio, tmp_path, "tiny", gguf_bytes(100 * 1024))
    studio.faults.fail(500, times=10, path="/file")
    sleeps = []
    with pytest.raises(OfflineError, match="3 failures in a row without progress"):
        make_cache(tmp_path, studio.url, sleeps, retries=2).pull("tiny")
    assert len(sleeps) == 2


def test_cancelling_ensure_model_stops_the_download_and_keeps_the_partial(file_server,
                                                                          tmp_path):
    file_server.stall_after = 1000      # then silent until released
    sleeps = []
    cache = ModelCache(str(tmp_path / "models"), min_free_bytes=0, sleep=sleeps.append)
    first_bytes = threading.Event()

    def progress(done, total):
        if done >= 1000:
            first_bytes.set()

    async def start_then_cancel():
        task = asyncio.ensure_future(cache.ensure_model("tiny", url=file_server.url,
                                                        progress=progress))
        while not first_bytes.is_set():
            await asyncio.sleep(0.01)       # polling for the first bytes, not waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        file_server.release.set()       # the stalled read ends; the worker sees the cancel
    asyncio.run(start_then_cancel())    # returns once the worker thread has stopped
    assert Partial(cache.cache_dir, "tiny").size() == 1000 and len(sleeps) == 1
    assert cache.get_model_path("tiny") is None
    assert file_server.ranges == [None]     # no second request after the cancel


def test_a_partial_survives_a_failed_run_and_the_next_process_resumes_it(studio, tmp_path):
    data = publish(studio, tmp_path, "tiny", gguf_bytes(MB))
    proxy = start_proxy(studio.server_address[1], cut_after=len(data) // 2)
    try:
        with pytest.raises(OfflineError, match="resumes"):
            make_cache(tmp_path, proxy.url, retries=0).pull("tiny")
    finally:
        proxy.stop()
    partial = Partial(str(tmp_path / "models"), "tiny")
    kept = partial.size()
    assert 0 < kept < len(data)
    assert make_cache(tmp_path, studio.url).get_model_path("tiny") is None
    report = make_cache(tmp_path, studio.url).pull("tiny")     # a fresh cache: a new process
    assert report["resumed_from"] == kept and report["fetched_bytes"] == len(data) - kept
    assert report["sha256"] == sha(data)


def test_a_partial_of_another_file_is_discarded_not_completed(studio, tmp_path):
    data = publish(studio, tmp_path, "tiny", gguf_bytes(200 * 1024))
    cache = make_cache(tmp_path, studio.url)
    os.makedirs(cache.cache_dir)
    partial = Partial(cache.cache_dir, "tiny")
    partial.prepare({"cloud_model": "tiny", "sha256": "0" * 64})   # an older version
    write(partial.path, b"GGUF" + b"x" * 5000)
    report = cache.pull("tiny")
    assert report["resumed_from"] == 0 and report["sha256"] == sha(data)


def test_a_corrupted_download_is_reported_and_never_activated(studio, tmp_path):
    data = publish(studio, tmp_path, "tiny", gguf_bytes(200 * 1024))
    blob = studio.store.model_path(studio.store.get_model("tiny"))
    damaged = bytearray(data)
    damaged[1000] ^= 0xFF
    write(blob, bytes(damaged))            # the manifest still names the original sha256
    cache = make_cache(tmp_path, studio.url)
    with pytest.raises(ChecksumMismatchError) as caught:
        asyncio.run(cache.ensure_model("tiny"))
    message = str(caught.value)
    assert sha(data) in message and sha(bytes(damaged)) in message
    assert caught.value.expected == sha(data) and caught.value.actual == sha(bytes(damaged))
    assert cache.get_model_path("tiny") is None and cache.list() == []
    assert leftovers(cache.cache_dir, "tiny") == []          # no partial, no final name


# -- large downloads: the hash and flush threads ------------------------------------------------
# The sha256 runs on a worker thread and the file is fdatasynced in the background every
# FLUSH_EVERY bytes; these downloads are large enough for both to carry across attempts.

def test_a_large_download_cut_three_times_is_hashed_and_flushed_whole(studio, tmp_path):
    data = publish(studio, tmp_path, "big", gguf_bytes(2 * FLUSH_EVERY + 12345))
    proxy = start_proxy(studio.server_address[1], cut_after=int(len(data) * 0.3))
    try:
        report = make_cache(tmp_path, proxy.url).pull("big")
        stats = dict(proxy.stats)
    finally:
        proxy.stop()
    assert stats["cuts"] == 3 and report["attempts"] == 4
    assert report["sha256"] == sha(data) and report["fetched_bytes"] <= 1.2 * len(data)
    with open(report["path"], "rb") as handle:
        assert handle.read() == data


def test_a_large_partial_that_the_server_will_not_resume_is_rehashed_from_zero(studio,
                                                                                 tmp_path):
    data = publish(studio, tmp_path, "big", gguf_bytes(2 * FLUSH_EVERY + 7))
    proxy = start_proxy(studio.server_address[1], cut_after=int(len(data) * 0.6))
    try:
        with pytest.raises(OfflineError):
            make_cache(tmp_path, proxy.url, retries=0).pull("big")
    finally:
        proxy.stop()
    kept = Partial(str(tmp_path / "models"), "big").size()
    assert kept > FLUSH_EVERY
    studio.faults.ignore_range = True       # the resume gets the whole file (200)
    report = make_cache(tmp_path, studio.url).pull("big")
    assert report["resumed_from"] == kept and report["fetched_bytes"] == len(data)
    assert report["sha256"] == sha(data)


def test_damage_in_the_last_bytes_of_a_large_download_is_caught(studio, tmp_path):
    data = publish(studio, tmp_path, "big", gguf_bytes(FLUSH_EVERY + 3 * HASH_CHUNK + 1))
    damaged = bytearray(data)
    damaged[-2] ^= 0x01
    write(studio.store.model_path(studio.store.get_model("big")), bytes(damaged))
    cache = make_cache(tmp_path, studio.url)
    with pytest.raises(ChecksumMismatchError) as caught:
        cache.pull("big")
    assert (caught.value.expected, caught.value.actual) == (sha(data), sha(bytes(damaged)))
    assert leftovers(cache.cache_dir, "big") == []


def test_the_digest_covers_exactly_the_bytes_in_the_file(tmp_path):
    data = os.urandom(3 * HASH_CHUNK + 999)
    path = tmp_path / "file"
    buffer = bytearray(HASH_CHUNK // 3 + 1)     # one buffer reused for every write
    with open(path, "w+b") as raw:
        dest = HashingFile(raw)
        try:
            for start in range(0, len(data), len(buffer)):
                piece = data[start:start + len(buffer)]
                buffer[:len(piece)] = piece
                dest.write(memoryview(buffer)[:len(piece)])
            dest.fsync()
            assert dest.hexdigest() == sha(data)
        finally:
            dest.close()
    with open(path, "r+b") as raw:              # reopened: what is there is hashed first
        dest = HashingFile(raw)
        try:
            assert dest.length == len(data)
            dest.seek(HASH_CHUNK + 5)           # a restart: the prefix is hashed again
            dest.truncate()
            dest.write(b"tail")
            dest.fsync()
            assert dest.hexdigest() == sha(data[:HASH_CHUNK + 5] + b"tail")
        finally:
            dest.close()


def test_a_failed_background_flush_is_raised_not_lost():
    read_end, write_end = os.pipe()     # fdatasync on a pipe fails (EINVAL): a real failure
    try:
        flusher = _Flusher(write_end)
        flusher.wrote(FLUSH_EVERY)
        with pytest.raises(OSError):
            flusher.finish()            # what the closing fsync calls first
        flusher = _Flusher(write_end)
        flusher.wrote(FLUSH_EVERY)
        with pytest.raises(OSError):    # the download stops at its next flush, not at the end
            wait_until(lambda: flusher.wrote(FLUSH_EVERY), what="the flush error")
        flusher.finish()                # raised once: nothing left to report
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_unknown_model_and_no_cloud_are_clear_errors(studio, tmp_path):
    with pytest.raises(NotFoundError, match="no model 'nope'"):
        make_cache(tmp_path, studio.url).pull("nope")
    from fmedge.config import EdgeConfig

    no_cloud = EdgeConfig(data_dir=str(tmp_path / "edge"), llm_backend="llamacpp")
    offline = ModelCache(str(tmp_path / "alone"), max_size_gb=1, config=no_cloud)
    with pytest.raises(NotFoundError, match="no cloud is configured"):
        asyncio.run(offline.ensure_model("llama2"))
    with pytest.raises(InvalidIdError):
        offline.get_model_path("../etc/passwd")


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs")
def test_not_enough_free_space_is_refused_before_downloading(studio, tmp_path):
    publish(studio, tmp_path, "big", gguf_bytes(2 * MB))
    with tmpfs("1m") as small:
        client = CloudClient(studio.url, API_KEY, DEVICE_ID)
        cache = ModelCache(os.path.join(small, "models"), cloud=client, min_free_bytes=0)
        with pytest.raises(StorageError, match="not enough free space for model big") as caught:
            cache.pull("big")
        assert "2.0 MB" in str(caught.value)
        assert file_requests(studio, "big") == []       # nothing was downloaded
        assert cache.get_model_path("big") is None


def test_a_model_over_the_cap_is_refused_before_downloading(studio, tmp_path):
    publish(studio, tmp_path, "big", gguf_bytes(2 * MB))
    cache = make_cache(tmp_path, studio.url, max_size_gb=1 / 1024)     # 1 MB
    with pytest.raises(UsageError, match="model_cache_size_gb"):
        cache.pull("big")
    assert file_requests(studio, "big") == []


# -- downloads from a URL -----------------------------------------------------------------------

def test_a_url_download_that_stalls_is_retried_and_resumed(file_server, tmp_path):
    data = file_server.data
    file_server.stall_after = len(data) // 3
    sleeps = []
    cache = ModelCache(str(tmp_path / "models"), sleep=sleeps.append, stall_timeout=0.5,
                       min_free_bytes=0)
    report = cache.pull("tiny", url=file_server.url, sha256=sha(data))
    assert report["attempts"] == 2 and len(sleeps) == 1
    assert report["sha256"] == sha(data) and report["verified"] is True
    assert file_server.ranges == [None, "bytes=%d-" % (len(data) // 3)]
    assert file_server.sent <= 1.2 * len(data)


def test_a_url_file_that_changed_meanwhile_is_fetched_again_whole(file_server, tmp_path):
    data = file_server.data
    cache = ModelCache(str(tmp_path / "models"), min_free_bytes=0)
    os.makedirs(cache.cache_dir)
    partial = Partial(cache.cache_dir, "tiny")
    partial.prepare({"url": file_server.url, "sha256": None})
    partial.save_meta({"origin": {"url": file_server.url, "sha256": None},
                       "state": {"validator": '"v0"'}})
    write(partial.path, data[:1000])
    report = cache.pull("tiny", url=file_server.url)
    assert file_server.ranges == ["bytes=1000-"]    # sent with If-Range "v0": 200 came back
    assert report["sha256"] == sha(data) and report["verified"] is False


def test_a_url_that_is_not_a_gguf_file_is_not_activated(file_server, tmp_path):
    file_server.data = b"<html>login required</html>"
    cache = ModelCache(str(tmp_path / "models"), min_free_bytes=0)
    with pytest.raises(UsageError, match="not a GGUF model"):
        cache.pull("tiny", url=file_server.url)
    assert leftovers(cache.cache_dir, "tiny") == []
    with pytest.raises(UsageError, match="not an http"):
        cache.pull("tiny", url="ftp://example.com/x.gguf")


# -- imports from a path ------------------------------------------------------------------------

def test_add_imports_a_real_gguf_and_refuses_anything_else(tmp_path):
    from tiny_model import make_model
    model = make_model(tmp_path, name="tiny-q8.gguf", ctx=256)
    cache = ModelCache(str(tmp_path / "models"), min_free_bytes=0)
    entry = cache.add(model)
    with open(model, "rb") as handle:
        assert entry["sha256"] == sha(handle.read())
    assert entry["name"] == "tiny-q8" and cache.get_model_path("tiny-q8") == entry["path"]
    not_gguf = write(tmp_path / "notes.gguf", b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(UsageError, match="not a GGUF model") as caught:
        cache.add(not_gguf)
    assert caught.value.code == "not_gguf"
    assert [e["name"] for e in cache.list()] == ["tiny-q8"]
    assert leftovers(cache.cache_dir, "notes") == []
    with pytest.raises(UsageError, match="is not a file"):
        cache.add(str(tmp_path / "missing.gguf"))


# -- eviction, in use, remove, clear ------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 100.0       # every reading is a later time: a strict LRU order
        return self.now


def fill(tmp_path, cache, names, size=MB):
    for index, name in enumerate(names):
        cache.add(write(tmp_path / ("%s.gguf" % name), gguf_bytes(size, seed=index)))


def test_lru_eviction_never_evicts_a_model_in_use(tmp_path):
    cache = ModelCache(str(tmp_path / "models"), max_size_gb=2.5 / 1024, clock=Clock(),
                       min_free_bytes=0)
    fill(tmp_path, cache, ["a", "b"])
    with cache.use("a") as path:        # a is the least recently used, but in use
        assert path == cache.get_model_path("a") and cache.in_use("a")
        entry = cache.add(write(tmp_path / "c.gguf", gguf_bytes(MB, seed=9)))
        assert entry["evicted"] == ["b"]
        assert [e["name"] for e in cache.list()] == ["a", "c"]
        assert [e["in_use"] for e in cache.list()] == [True, False]
    assert not cache.in_use("a")
    cache.get_model_path("c")           # c is now the most recently used: a goes next
    assert cache.add(write(tmp_path / "d.gguf", gguf_bytes(MB, seed=10)))["evicted"] == ["a"]


def test_a_model_in_use_by_another_process_is_never_evicted(tmp_path):
    # The real clock: the other process records its use of "a" with its own clock.
    cache = ModelCache(str(tmp_path / "models"), max_size_gb=1.5 / 1024, min_free_bytes=0)
    fill(tmp_path, cache, ["a"])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fmedge.cache.models import ModelCache\n"
         "with ModelCache(sys.argv[1], max_size_gb=1).use('a'):\n"
         "    print('holding', flush=True); sys.stdin.read()", cache.cache_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert cache.in_use("a")
        entry = cache.add(write(tmp_path / "b.gguf", gguf_bytes(MB, seed=5)))
        assert entry["evicted"] == [] and cache.get_model_path("a")   # over the cap, kept
        with pytest.raises(BusyError, match="in use"):
            cache.remove("a")
    finally:
        holder.communicate("", timeout=30)
    wait_until(lambda: not cache.in_use("a"), what="the holder to exit")
    assert cache.evict() == ["a"]


def test_remove_and_clear(tmp_path):
    cache = ModelCache(str(tmp_path / "models"), clock=Clock(), min_free_bytes=0)
    fill(tmp_path, cache, ["a", "b", "c"], size=4096)
    write(Partial(cache.cache_dir, "d").path, b"GGUF half")
    assert cache.remove("a") is True and cache.remove("a") is False
    assert cache.get_model_path("a") is None
    with cache.use("b"):
        report = cache.clear()
    assert report == {"removed": ["c"], "kept_in_use": ["b"], "freed_bytes": 4096,
                      "partials_removed": 1}
    assert [e["name"] for e in cache.list()] == ["b"]
    assert leftovers(cache.cache_dir, "d") == []


def test_files_without_index_entries_are_listed_and_stale_entries_dropped(tmp_path):
    cache = ModelCache(str(tmp_path / "models"), min_free_bytes=0)
    fill(tmp_path, cache, ["a"], size=4096)
    write(os.path.join(cache.cache_dir, "hand-copied.gguf"), gguf_bytes(2048))
    os.unlink(cache.get_model_path("a"))
    [entry] = cache.list()
    assert (entry["name"], entry["sha256"], entry["size"]) == ("hand-copied", None, 2048)


# -- the Ollama backend -------------------------------------------------------------------------

def test_with_the_ollama_backend_ensure_model_asks_ollama_to_pull(tmp_path):
    standin = start_standin(models=["llama3.2"])
    try:
        config = EdgeConfig(data_dir=str(tmp_path / "edge"), llm_backend="ollama",
                            llm_base_url=standin.url)
        cache = ModelCache(config=config)
        seen = []
        name = asyncio.run(cache.ensure_model("qwen2.5:0.5b",
                                              progress=lambda d, t: seen.append((d, t))))
        assert name == "qwen2.5:0.5b" and len(standin.requests_to("/api/pull")) == 1
        assert seen and seen[-1][0] == seen[-1][1]
        assert asyncio.run(cache.ensure_model("qwen2.5:0.5b")) == "qwen2.5:0.5b"
        assert asyncio.run(cache.ensure_model("llama3.2")) == "llama3.2"
        assert len(standin.requests_to("/api/pull")) == 1      # both were already there
        assert pull_model(config, "tinyllama", progress=False) == {
            "name": "tinyllama", "backend": "ollama", "pulled": True}
        assert "tinyllama:latest" in list_models(config)["backend_models"]
        with pytest.raises(InvalidIdError):
            asyncio.run(cache.ensure_model("../x"))
    finally:
        standin.stop()


# -- the CLI functions --------------------------------------------------------------------------

def test_cli_functions_return_json_ready_data(studio, tmp_path):
    import json
    data = publish(studio, tmp_path, "tiny", gguf_bytes(100 * 1024))
    config = EdgeConfig(data_dir=str(tmp_path / "edge"), llm_backend="llamacpp",
                        cloud_url=studio.url, api_key=API_KEY, min_free_disk_mb=0)
    pulled = pull_model(config, "tiny", progress=False)
    assert pulled["sha256"] == sha(data) and pulled["already_cached"] is False
    assert pull_model(config, "tiny", progress=False)["already_cached"] is True
    added = add_model(config, write(tmp_path / "usb.gguf", gguf_bytes(4096)), name="usb",
                      progress=False)
    listing = list_models(config)
    assert [m["name"] for m in listing["models"]] == ["tiny", "usb"]
    assert listing["count"] == 2 and listing["used_bytes"] == len(data) + 4096
    assert "backend_models" not in listing
    assert remove_model(config, "usb") == {"removed": "usb"}
    with pytest.raises(NotFoundError, match="models list"):
        remove_model(config, "usb")
    assert clear_models(config)["removed"] == ["tiny"]
    for value in (pulled, added, listing):
        json.dumps(value)


# -- progress -----------------------------------------------------------------------------------

def test_progress_draws_a_bar_only_on_a_terminal():
    import io
    assert terminal_progress("x", io.StringIO()) is None
    master, slave = os.openpty()            # a real terminal
    try:
        with os.fdopen(slave, "w") as screen:
            bar = terminal_progress("pulling tiny", screen)
            assert isinstance(bar, ProgressBar)
            bar(512, 1024)
            bar(1024, 1024)
        shown = b""
        while True:     # a pty hands over what it has: read until the closed end (EIO)
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            shown += data
        shown = shown.decode()
    finally:
        os.close(master)
    assert "pulling tiny" in shown and "100%" in shown and shown.endswith("\n")
