"""Model download throughput on loopback: ModelCache against a plain urllib3 read.

    python3 tools/bench/bench_download.py [--size-mb 200] [--rounds 3]
                                          [--link-size-mb 40] [--link-latency-ms 1]

tools/studio.py (its own process, as a real cloud would be) serves a random file that
starts with the GGUF magic. Each round, interleaved so both see the same server and page
cache state:

- baseline: one urllib3 GET of the file, streamed into a file in 1 MiB chunks (no hash,
  no fsync): the least a download can do;
- fm-edge: ``ModelCache.pull`` from an empty cache: manifest, free-space check, Range-ready
  partial, sha256 while writing, fsync of the file, atomic rename, fsync of the directory,
  index write.

Before each download (outside the timing) the disk is synced, so no round pays for
writing back or freeing the files of the one before.

Figure ``model_download_throughput``: median MB/s of fm-edge, with the baseline's median
and the ratio (target >= 0.8). Also printed: what sha256 alone costs on this CPU for the
same size, ``hashed_baseline`` (the baseline loop also feeding sha256: the least a
verified download can do) with its ratio, the load average and the CPU count. On
loopback the client, the studio and the hash all compete for the CPU, so the hash shows
up in full; on a real link (tens of MB/s) it runs in the time spent waiting for the
network.

Figure ``model_download_throughput_slow_link``: the same comparison once through
tools/chaosproxy.py (its own process) adding ``--link-latency-ms`` per 16 KB chunk, i.e.
a link of roughly 10 MB/s, closer to what a device sees.
"""

import argparse
import hashlib
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, report

import urllib3

from fmedge.cache.models import ModelCache
from fmedge.sync.client import CloudClient

API_KEY = "bench-key-1"
STUDIO = os.path.join(ROOT, "tools", "studio.py")
CHAOSPROXY = os.path.join(ROOT, "tools", "chaosproxy.py")
MODEL = "bench-model"
LINK_MODEL = "bench-link-model"
MB = 1024 * 1024


def make_model(path, size_mb):
    """A random file (incompressible, like real weights) that starts like a GGUF file."""
    with open(path, "wb") as handle:
        handle.write(b"GGUF")
        for _ in range(size_mb):
            handle.write(os.urandom(MB))
    return path


class Child:
    """A server in a child process; ``address`` is read from its first stdout line."""

    def __init__(self, command, marker):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.address = self._read_address(marker)

    def _read_address(self, marker):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = self.proc.stdout.readline().decode()
                if marker in line:
                    return line.split(marker, 1)[1].split()[0]
        raise RuntimeError("%s did not start: %s" % (self.proc.args,
                                                     self.proc.stderr.read().decode()))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def start_studio(db):
    command = [sys.executable, STUDIO, "--port", "0", "--db", db, "--api-key", API_KEY]
    studio = Child(command, "listening on ")
    studio.url = studio.address
    return studio


def start_slow_link(studio_url, latency_ms):
    """tools/chaosproxy.py in front of the studio: ``latency_ms`` per 16 KB chunk."""
    port = studio_url.rsplit(":", 1)[1]
    command = [sys.executable, CHAOSPROXY, "0", "127.0.0.1", port, "latency_ms=%g" % latency_ms]
    proxy = Child(command, "listening on ")
    proxy.url = "http://" + proxy.address
    return proxy


def baseline_download(url, dest, name, digest=None):
    pool = urllib3.PoolManager()
    headers = {"Authorization": "Bearer " + API_KEY, "X-Device-Id": "bench"}
    started = time.perf_counter()
    response = pool.request("GET", "%s/api/v1/edge/models/%s/file" % (url, name),
                            headers=headers, preload_content=False)
    with open(dest, "wb") as handle:
        for chunk in response.stream(MB):
            handle.write(chunk)
            if digest is not None:
                digest.update(chunk)
    response.release_conn()
    elapsed = time.perf_counter() - started
    pool.clear()
    return elapsed


def cache_download(url, cache_dir, name):
    with CloudClient(url, API_KEY, "bench") as client:
        cache = ModelCache(cache_dir, max_size_gb=50, cloud=client)
        started = time.perf_counter()
        done = cache.pull(name)
        elapsed = time.perf_counter() - started
    if done["fetched_bytes"] != done["size"] or not done["verified"]:
        raise RuntimeError("the benchmark download was not a clean verified one: %r" % done)
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--link-size-mb", type=int, default=40)
    parser.add_argument("--link-latency-ms", type=float, default=1.0)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fm-edge-bench-download-")
    try:
        db = os.path.join(folder, "studio.db")
        add_model(db, folder, MODEL, args.size_mb)
        add_model(db, folder, LINK_MODEL, args.link_size_mb)
        studio = start_studio(db)
        try:
            loopback(studio.url, folder, args.size_mb, args.rounds)
            slow_link(studio.url, folder, args.link_size_mb, args.link_latency_ms)
        finally:
            studio.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def add_model(db, folder, name, size_mb):
    source = make_model(os.path.join(folder, "source.gguf"), size_mb)
    subprocess.run([sys.executable, STUDIO, "add-model", name, source, "--db", db],
                   check=True, stdout=subprocess.DEVNULL)
    os.unlink(source)


def compare(url, folder, name, size_mb, rounds, hashed=False):
    """MB/s samples of fm-edge, the baseline and (if ``hashed``) the hashed baseline,
    interleaved round by round."""
    size = (size_mb * MB + 4) / MB
    plain, ours, verified = [], [], []
    for index in range(rounds):
        target = os.path.join(folder, "plain-%d" % index)
        runs = [(plain, None)] + ([(verified, hashlib.sha256())] if hashed else [])
        for samples, digest in runs:
            os.sync()
            samples.append(size / baseline_download(url, target, name, digest))
            os.unlink(target)
        cache_dir = os.path.join(folder, "cache-%d" % index)
        os.sync()
        ours.append(size / cache_download(url, cache_dir, name))
        shutil.rmtree(cache_dir)
    return ours, plain, verified


def loopback(url, folder, size_mb, rounds):
    ours, plain, verified = compare(url, folder, MODEL, size_mb, rounds, hashed=True)
    report("model_download_throughput", statistics.median(ours), "MB/s",
           baseline=statistics.median(plain), baseline_name="urllib3 streaming read to a file",
           target=">= 0.8", size_mb=size_mb, rounds=rounds,
           samples=[round(x, 1) for x in ours], baseline_samples=[round(x, 1) for x in plain],
           hashed_baseline=round(statistics.median(verified), 1),
           hashed_baseline_ratio=round(statistics.median(verified) / statistics.median(plain), 3),
           sha256_alone_s=round(sha256_seconds(size_mb), 3),
           load_avg_1m=round(os.getloadavg()[0], 2), cpus=os.cpu_count())


def slow_link(url, folder, size_mb, latency_ms):
    proxy = start_slow_link(url, latency_ms)
    try:
        ours, plain, _ = compare(proxy.url, folder, LINK_MODEL, size_mb, 1)
    finally:
        proxy.stop()
    report("model_download_throughput_slow_link", ours[0], "MB/s", baseline=plain[0],
           baseline_name="urllib3 streaming read to a file", target=">= 0.8",
           size_mb=size_mb, link="chaosproxy latency_ms=%g per 16 KB" % latency_ms)


def sha256_seconds(size_mb):
    """What hashing ``size_mb`` costs on this CPU: the floor of any verified download."""
    block = os.urandom(MB)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(size_mb):
        digest.update(block)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
