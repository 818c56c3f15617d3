"""SyncManager: keeps a device in sync with the cloud in the background (the seed's API).

    sync = SyncManager(cloud_url="https://studio.example.com", api_key="...",
                       sync_interval=60, ping_interval=30)
    sync.status                       # SyncStatus.OFFLINE until the cloud answers
    await sync.sync_results()         # manual passes
    await sync.sync_pipelines()
    sync.on_status_change = lambda status: print(f"Status: {status}")
    await sync.start()                # background loop
    await sync.stop()

The work of a pass is ``once.SyncPass`` (blocking), always run in a worker thread so the
event loop never waits for the network or an fsync. Around it this module keeps the
schedule and the status:

- a pass every ``sync_interval`` while all is well; after a pass fails once the
  cloud has answered (HTTP 5xx, 429/503, a reply cut mid-body), exponential backoff
  with full jitter from 1 s to 300 s, forever (``backoff.Backoff``), never earlier than
  a ``Retry-After``;
- a ping every ``ping_interval``. When the cloud cannot be reached at all (a ping fails,
  or a pass fails at its first request), passes stop: they would only repeat the failing
  ping. Pings alone watch for the link, from 1 s growing to ``ping_interval``, and the
  first one that gets through starts a pass at once (no waiting out a 5-minute backoff
  after a link blip);
- a refused api_key: status ERROR, one log line, then only a ping every
  ``ping_interval``: no retry storm, and a fixed key is noticed within one interval;
- every pass holds the cross-process sync lock (``lock.SyncLock``), so it never runs
  beside ``fm-edge sync`` from cron;
- status changes are logged once each and fire ``on_status_change`` once each.

Constructing a SyncManager touches neither the network nor the stores: both are opened
on the first pass. Time and randomness are injectable (``clock``, ``sleep``, ``rng``):
tests drive the schedule with ``step()`` and a fake clock instead of real minutes.
"""

import asyncio
import enum
import inspect
import logging
import random
import threading
import time

from ..aio import run_blocking
from ..config import EdgeConfig
from ..errors import ConfigError, FmEdgeError
from .backoff import Backoff, honoured_retry_after, ping_backoff
from .client import MAX_BATCH_RESULTS
from .lock import SyncLock
from .once import (COUNTER_NAMES, DEFAULT_WAIT_LOCK_S, NOT_CONFIGURED, PassOutcome,
                   SyncCounters, failure_kind, open_sync_pass)

log = logging.getLogger("fmedge.sync")

LOCK_RETRY_S = 5.0     # another sync held the lock: it is usually a short cron pass
STOP_GRACE_S = 10.0    # stop() waits this long for a request in flight, then lets it go


class SyncStatus(str, enum.Enum):
    """Where sync stands; ``str(status)`` and f-strings give the plain word."""

    ONLINE = "online"      # the last contact with the cloud worked
    OFFLINE = "offline"    # no answer: link down, timeout, cut reply (or never contacted)
    SYNCING = "syncing"    # a pass is running
    ERROR = "error"        # the cloud answered, but refused: api_key, HTTP 5xx/429/503...

    def __str__(self):
        return self.value

    def __format__(self, spec):
        return format(self.value, spec)


class SyncManager:
    """Background and on-demand sync of results (up) and pipelines (down)."""

    def __init__(self, cloud_url=None, api_key=None, sync_interval=None, ping_interval=None,
                 *, results=None, pipelines=None, device_id=None, config=None, client=None,
                 clock=time.time, sleep=asyncio.sleep, rng=None, monotonic=None,
                 batch_size=MAX_BATCH_RESULTS, wait_lock_s=DEFAULT_WAIT_LOCK_S):
        # Arguments win over the config; the config (defaults < config.json < env) fills
        # the rest, so the seed's four arguments alone are enough.
        self.config = _effective_config(config, cloud_url=cloud_url, api_key=api_key,
                                        sync_interval=sync_interval,
                                        ping_interval=ping_interval)
        self.sync_interval = float(self.config.sync_interval)
        self.ping_interval = float(self.config.ping_interval)
        self.batch_size = batch_size
        self.wait_lock_s = wait_lock_s
        self.on_status_change = None
        self.counters = SyncCounters()
        self.offline_since = None      # clock() time the cloud was first missed; None online
        self.last_sync_at = None       # clock() time of the last pass that fully worked
        self.last_error = None         # the latest failure (an FmEdgeError), kept for status
        self._given = {"results": results, "pipelines": pipelines, "device_id": device_id,
                       "client": client}
        self._clock = clock
        self._mono = monotonic or (time.monotonic if clock is time.time else clock)
        self._sleep = sleep
        rng = rng if rng is not None else random.Random()
        self._backoff = Backoff(rng=rng)
        self._ping_backoff = ping_backoff(self.ping_interval, rng=rng)
        self._status = SyncStatus.OFFLINE
        self._status_known = False
        self._failure = None           # failure_kind of the last failure, None after success
        self._link_wait = False        # no link or no key: passes wait for a ping to pass
        self._not_before = 0.0         # Retry-After: no request before this monotonic time
        self._next_pass_at = 0.0
        self._next_ping_at = 0.0
        self._stop_flag = threading.Event()   # read by the worker thread between requests
        self._flock = SyncLock(self.config.data_dir)
        self._sync = None
        self._closer = None
        self._task = None
        self._wake = None
        self._pass_lock = None         # asyncio objects are made inside the running loop

    @classmethod
    def for_runtime(cls, runtime, **kwargs):
        """A manager sharing the runtime's config, stores and device id."""
        return cls(config=runtime.config, results=runtime.results,
                   pipelines=runtime.pipelines, device_id=runtime.device_id, **kwargs)

    def __repr__(self):   # never shows the api_key
        return "SyncManager(%r, status=%s)" % (self.config.cloud_url, self._status)

    # -- what callers read ----------------------------------------------------------------------

    @property
    def status(self):
        return self._status

    @property
    def running(self):
        return self._task is not None and not self._task.done()

    def stats(self):
        """Status, times, last error and every counter, for `status` and /metrics."""
        return dict(self.counters.as_dict(), status=str(self._status),
                    offline_since=self.offline_since, last_sync_at=self.last_sync_at,
                    last_error=str(self.last_error) if self.last_error else None,
                    next_pass_in=self._next_pass_in())

    def _next_pass_in(self):
        if not self.running or self._link_wait:
            return None    # not scheduled: the next successful ping decides
        return max(0.0, self._next_pass_at - self._mono())

    # -- on demand ------------------------------------------------------------------------------

    async def sync_results(self):
        """Upload every pending result now; returns a report dict (never raises for the
        cloud: the report, ``status`` and ``last_error`` say what happened)."""
        return await self._exclusive(lambda sync: sync.upload_results())

    async def sync_pipelines(self):
        """Apply the cloud's pipeline changes now; returns a report dict."""
        return await self._exclusive(lambda sync: sync.pull_pipelines())

    async def sync_now(self):
        """One full pass now (ping, register, results, pipelines, heartbeat)."""
        return await self._exclusive(None)

    def request_sync(self):
        """Ask the background loop for a pass as soon as possible (e.g. POST /sync)."""
        self._link_wait = False
        self._next_pass_at = min(self._next_pass_at, max(self._mono(), self._not_before))
        if self._wake is not None:
            self._wake.set()

    # -- background -----------------------------------------------------------------------------

    async def start(self):
        """Start the background loop and return at once; the first pass follows shortly."""
        if self.running:
            return
        if not self.config.cloud_url:
            raise ConfigError(NOT_CONFIGURED)
        self._stop_flag.clear()
        self._wake = asyncio.Event()
        now = self._mono()
        self._next_pass_at = now
        self._next_ping_at = now + self.ping_interval
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self):
        """Stop the loop (a request in flight gets STOP_GRACE_S to finish), close what the
        manager opened itself. Given stores stay open: their owner closes them."""
        task, self._task = self._task, None
        self._stop_flag.set()
        if self._wake is not None:
            self._wake.set()
        if task is not None and not await _finish(task, STOP_GRACE_S):
            log.warning("sync stop: a request was still running after %g s; it finishes "
                        "in the background (its results are marked when it does)",
                        STOP_GRACE_S)
            return
        if self._pass_lock is not None:
            async with self._pass_lock:   # a manual sync_*() in flight ends at its next batch
                await self._close_owned()
        else:
            await self._close_owned()
        self._stop_flag.clear()

    async def step(self):
        """Run whatever is due now (a pass or a ping); return seconds until the next.

        The background loop is ``while True: await wait(await step())``; tests call it
        directly with a fake clock to walk through hours of schedule in milliseconds.
        """
        now = self._mono()
        if now >= self._next_pass_at:
            await self._scheduled_pass()
        elif now >= self._next_ping_at:
            await self._scheduled_ping()
        return max(0.0, min(self._next_pass_at, self._next_ping_at) - self._mono())

    async def _loop(self):
        while not self._stop_flag.is_set():
            try:
                delay = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug must not end sync for good: log it, back off, go on
                log.exception("sync: unexpected error; retrying with backoff")
                self._next_pass_at = self._mono() + self._backoff.next_delay()
                delay = self._next_pass_at - self._mono()
            await self._wait(delay)

    async def _wait(self, delay):
        """Sleep ``delay`` (with the injected sleep), or less if woken by stop/request."""
        if delay <= 0:
            await asyncio.sleep(0)
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
            self._wake.clear()

    # -- the schedule ---------------------------------------------------------------------------

    async def _scheduled_pass(self):
        outcome = await self._exclusive(None, report=False)
        now = self._mono()
        if outcome is None:                        # another process holds the sync lock
            self._next_pass_at = now + LOCK_RETRY_S
            return
        err = outcome.error
        if err is None:
            self._backoff.reset()
            self._ping_backoff.reset()
            self._next_pass_at = now + self.sync_interval
            self._next_ping_at = now + self.ping_interval
            return
        if outcome.at_ping and failure_kind(err) in ("offline", "auth"):
            self._wait_for_link(err, now)
        else:
            self._schedule_retry(err, now)

    def _schedule_retry(self, err, now):
        """The cloud answered, then something failed: back off, honour Retry-After."""
        wait = honoured_retry_after(getattr(err, "retry_after", None))
        self._not_before = max(self._not_before, now + wait)
        if failure_kind(err) == "auth":
            delay = self._backoff.max_out()
        else:
            delay = self._backoff.next_delay(wait)
        self._next_pass_at = now + delay
        self._next_ping_at = max(now + self.ping_interval, self._not_before)
        log.debug("sync pass failed (%s); next pass in %.1f s", err, delay)

    def _wait_for_link(self, err, now):
        """No link (or no valid key): no passes, only pings, until one gets through."""
        self._link_wait = True
        self._next_pass_at = float("inf")
        if failure_kind(err) == "offline":
            delay = self._ping_backoff.next_delay()
        else:
            delay = self.ping_interval
        self._next_ping_at = max(now + delay, self._not_before)
        log.debug("sync: cloud not usable (%s); next ping in %.1f s", err, delay)

    async def _scheduled_ping(self):
        try:
            sync = await self._open()
            await run_blocking(sync.ping)
        except FmEdgeError as err:
            await self._ping_failed(err)
            return
        now = self._mono()
        self._ping_backoff.reset()
        self._next_ping_at = now + self.ping_interval
        if self._link_wait:
            # The link (or the key) is back: sync now instead of waiting out a backoff.
            self._link_wait = False
            self._failure = None
            self._backoff.reset()
            self._next_pass_at = max(now, self._not_before)
            await self._set_status(SyncStatus.ONLINE)
        elif self._failure is None:
            await self._set_status(SyncStatus.ONLINE)

    async def _ping_failed(self, err):
        now = self._mono()
        kind = failure_kind(err)
        self.last_error = err
        wait = honoured_retry_after(getattr(err, "retry_after", None))
        self._not_before = max(self._not_before, now + wait)
        if kind in ("offline", "auth"):
            self._failure = kind
            self._wait_for_link(err, now)
        else:   # the cloud answered the ping with an error: passes keep their backoff
            self._failure = self._failure or kind
            self._next_ping_at = max(now + self.ping_interval, self._not_before)
        await self._set_status(_status_for(kind), err)

    # -- running work ---------------------------------------------------------------------------

    async def _exclusive(self, work, report=True):
        """Run ``work(sync)`` (or a full pass) under both locks; update status.

        Returns a report dict (``report=True``) or the PassOutcome; None / a busy report
        when another process holds the sync lock.
        """
        if self._pass_lock is None:
            self._pass_lock = asyncio.Lock()
        async with self._pass_lock:
            before = self.counters.as_dict()
            try:
                sync = await self._open()
            except FmEdgeError as err:   # bad ca_bundle, unwritable data dir, ...
                outcome = PassOutcome([err], at_ping=True)
                await self._after(outcome)
                return _report(err, before, self) if report else outcome
            if not await run_blocking(self._flock.acquire, self.wait_lock_s):
                busy = self._flock.busy_error(self.wait_lock_s)
                log.info("sync skipped: %s", busy)
                return _report(busy, before, self) if report else None
            try:
                outcome = await self._run_locked(sync, work)
            finally:
                self._flock.release()
            await self._after(outcome)
        return _report(outcome.error, before, self) if report else outcome

    async def _run_locked(self, sync, work):
        if work is None:   # a full pass: its ping decides whether this is "syncing"
            try:
                await run_blocking(sync.ping)
            except FmEdgeError as err:
                return PassOutcome([err], at_ping=True)
            # An answered ping proves the link, not that a failing cloud (HTTP 5xx) or a
            # full disk here is fixed: those stay ERROR until a pass gets through.
            if self._failure not in ("cloud", "local"):
                await self._set_status(SyncStatus.ONLINE)
                await self._set_status(SyncStatus.SYNCING)
            return await run_blocking(lambda: sync.run(SyncStatus.SYNCING, ping=False))
        if self._status is SyncStatus.ONLINE:
            await self._set_status(SyncStatus.SYNCING)
        try:
            await run_blocking(work, sync)
        except FmEdgeError as err:
            return PassOutcome([err])
        return PassOutcome()

    async def _after(self, outcome):
        err = outcome.error
        if err is None:
            self._failure = None
            if self._link_wait:    # a manual pass got through before the loop's next ping
                self._link_wait = False
                self._next_pass_at = self._mono() + self.sync_interval
            self.last_sync_at = self._clock()
            await self._set_status(SyncStatus.ONLINE)
            return
        self.last_error = err
        self._failure = failure_kind(err)
        await self._set_status(_status_for(self._failure), err)

    async def _open(self):
        if self._sync is None:
            self._sync, self._closer = await run_blocking(self._open_now)
        return self._sync

    def _open_now(self):
        return open_sync_pass(self.config, counters=self.counters, batch_size=self.batch_size,
                              stop=self._stop_flag, **self._given)

    async def _close_owned(self):
        closer, self._closer, self._sync = self._closer, None, None
        if closer is not None:
            await run_blocking(closer.close)

    # -- status ---------------------------------------------------------------------------------

    async def _set_status(self, new, err=None):
        old = self._status
        if new is old and self._status_known:
            return
        self._status, self._status_known = new, True
        self._log_change(old, new, err)
        if new is not old:
            await self._notify(new)

    def _log_change(self, old, new, err):
        url = self.config.cloud_url
        now = self._clock()
        if new in (SyncStatus.OFFLINE, SyncStatus.ERROR) and self.offline_since is None:
            self.offline_since = now
        since = _when(self.offline_since)
        if new is SyncStatus.ONLINE:
            if self.offline_since is not None:
                log.info("sync: cloud %s reachable again (offline since %s, %.0f s)", url,
                         since, now - self.offline_since)
            elif old is not SyncStatus.SYNCING:
                log.info("sync: cloud %s reachable", url)
            self.offline_since = None
        elif new is SyncStatus.OFFLINE:
            log.warning("sync: offline since %s: %s", since, err)
        elif new is SyncStatus.ERROR and failure_kind(err) == "auth":
            log.error("sync: %s. Sync is paused (offline since %s); the key is checked "
                      "again every %g s", err, since, self.ping_interval)
        elif new is SyncStatus.ERROR:
            log.warning("sync: failing since %s: %s", since, err)
        else:
            log.debug("sync: %s", new)

    async def _notify(self, status):
        callback = self.on_status_change
        if callback is None:
            return
        try:
            result = callback(status)
            if inspect.isawaitable(result):
                await result
        except Exception:   # the user's callback must not break sync
            log.exception("sync: on_status_change callback failed for status %s", status)


# Counters read as attributes: sync.uploaded, sync.pipelines_refused, ...
for _name in COUNTER_NAMES:
    setattr(SyncManager, _name,
            property(lambda self, _n=_name: getattr(self.counters, _n),
                     doc="Running total of %s since this manager was made." % _name))


def _effective_config(config, **arguments):
    base = config if config is not None else EdgeConfig.load()
    given = {name: value for name, value in arguments.items() if value is not None}
    return base.with_overrides(**given) if given else base


def _status_for(kind):
    return SyncStatus.OFFLINE if kind == "offline" else SyncStatus.ERROR


def _when(timestamp):
    if timestamp is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _report(err, before, manager):
    after = manager.counters.as_dict()
    return {"ok": err is None, "status": str(manager.status),
            "error": str(err) if err else None,
            "error_code": getattr(err, "code", None) if err else None,
            "counters": {name: after[name] - before[name] for name in after}}


async def _finish(task, grace):
    """True when ``task`` ended within ``grace`` seconds; else cancel it and say False."""
    done, _ = await asyncio.wait({task}, timeout=grace)
    if done:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("sync loop ended with an error: %r", exc)
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False
