"""One sync pass, and ``sync_once`` for cron (``fm-edge sync``).

A pass is plain blocking code: the SyncManager runs it in a worker thread on its
schedule, ``sync_once`` runs it directly. Its steps, in order:

1. ``GET /ping``: is the cloud there and does it take our api_key? Nothing else is tried
   when it is not.
2. ``POST /devices/register`` on first contact (remembered in the state file, redone
   when the cloud forgets the device: a heartbeat answered 404).
3. Results, oldest first, in batches of at most 500 results and 1 MiB of gzip. Each batch
   carries an ``Idempotency-Key`` derived from its run ids and their bytes, so a batch
   resent after a crash or a lost answer is recognised by the cloud. A result is marked
   synced only when the cloud listed its run id as accepted or duplicate; a result it
   rejected is quarantined with the cloud's reason and never blocks the rest. The queue is
   read one page at a time (``pending_now(limit, after_id)``): memory does not grow
   with the queue.
4. Pipelines: the changes feed from the saved cursor; each changed document is fetched
   with ``If-None-Match`` (304 = unchanged), validated like a local one, and only then
   replaces the cached version. A refused update is counted and logged; the previous
   version keeps running. Deletions remove cloud pipelines only, never a ``local`` one.
5. ``POST /devices/{id}/heartbeat``: queue depth, free disk, cached pipeline versions.

Results and pipelines are independent directions: a cloud error on one (HTTP 500 on
``/results``) does not stop the other. A lost link or a refused api_key ends the pass.

What a pass remembers lives in ``PIPELINE_CACHE_DIR/sync_state.json`` (``SyncState``),
written atomically: the changes cursor, the ETag of each pipeline it installed, the
registration, the last refused update per pipeline, and the *pins*. PipelineCache has no
pin concept, so pins live here: a pinned pipeline keeps its cached version; sync neither
replaces nor deletes it until it is unpinned (``pin_pipeline`` / ``unpin_pipeline``).
"""

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import List, Optional

from ..errors import (AuthError, BusyError, ConfigError, FmEdgeError, InvalidIdError,
                      NotFoundError, OfflineError, PipelineValidationError, StorageError,
                      UsageError)
from ..fsutil import atomic_write, free_bytes
from ..ids import is_valid_id
from ..strict_json import loads_strict
from .client import MAX_BATCH_RESULTS
from .lock import SyncLock

log = logging.getLogger("fmedge.sync")

STATE_FILE_NAME = "sync_state.json"
DEFAULT_WAIT_LOCK_S = 5.0
# Uncompressed JSON gathered per batch before gzip. Results compress several-fold, so this
# usually lands under the 1 MiB gzip limit; a batch that does not is split in half.
RAW_BATCH_BUDGET = 4 * 1024 * 1024
# The heartbeat body must stay small (the studio caps it at 64 KB).
HEARTBEAT_MAX_PIPELINES = 500

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_OFFLINE, EXIT_BUSY, EXIT_AUTH = 0, 1, 2, 3, 4, 5

COUNTER_NAMES = (
    "uploaded",              # results the cloud took for the first time
    "duplicate",             # results the cloud already had (a resend after a lost answer)
    "rejected",              # results the cloud refused: quarantined with its reason
    "quarantined_locally",   # results that can never be sent (not JSON, over 1 MiB alone)
    "batches",               # batches acknowledged
    "replayed_batches",      # batches the cloud answered from its idempotency record
    "failed_attempts",       # requests that failed (each retry counts)
    "pipelines_updated",
    "pipelines_unchanged",   # listed as changed, but the ETag still matched (304)
    "pipelines_refused",     # failed validation: the cached version kept running
    "pipelines_deleted",
    "pipelines_pinned",      # changes skipped because the pipeline is pinned
    "pipelines_kept_local",  # cloud changes not applied over a pipeline added locally
)


class SyncCounters:
    """Running totals, one attribute per name in COUNTER_NAMES."""

    def __init__(self):
        for name in COUNTER_NAMES:
            setattr(self, name, 0)

    def add(self, name, amount=1):
        setattr(self, name, getattr(self, name) + amount)

    def as_dict(self):
        return {name: getattr(self, name) for name in COUNTER_NAMES}


def is_lock_busy(err):
    """Another sync holds the lock (a cloud's 429/503 is a BusyError too, with a status)."""
    return isinstance(err, BusyError) and not hasattr(err, "cloud_status")


def failure_kind(err):
    """What a failure says about the cloud: offline, auth, local (this device) or cloud."""
    if isinstance(err, AuthError):
        return "auth"
    if isinstance(err, OfflineError):
        return "offline"
    if isinstance(err, (StorageError, ConfigError)) or is_lock_busy(err):
        return "local"
    return "cloud"


def ends_pass(err):
    """True when nothing else is worth trying in this pass: the link or the key is gone,
    or the cloud asked for quiet (429/503, Retry-After) and honouring it means no request
    at all until then, not just none to the endpoint that said so."""
    return failure_kind(err) in ("auth", "offline") or isinstance(err, BusyError) or \
        getattr(err, "retry_after", None) is not None


def exit_code_for(err):
    """The documented `fm-edge sync` exit code for a failure."""
    if err is None:
        return EXIT_OK
    if is_lock_busy(err):
        return EXIT_BUSY
    kind = failure_kind(err)
    if kind == "auth":
        return EXIT_AUTH
    if kind == "offline" or err.retryable:
        return EXIT_OFFLINE
    return EXIT_USAGE if err.exit_code == EXIT_USAGE else EXIT_ERROR


# == What a pass remembers =====================================================================

class SyncState:
    """sync_state.json: cursor, ETags, pins, refused updates, registration."""

    def __init__(self, path, data=None):
        data = data or {}
        self.path = path
        self.cursor = int(data.get("cursor", 0))
        self.etags = dict(data.get("etags", {}))        # id -> {"etag", "sha256"}
        self.pins = dict(data.get("pins", {}))          # id -> pinned version
        self.refused = dict(data.get("refused", {}))    # id -> {version, sha256, reason, at}
        self.registered = data.get("registered")        # {device_id, version, cloud}
        self._saved = self._text()   # text, not dicts: the live dicts are mutated in place

    @classmethod
    def load(cls, directory):
        path = os.path.join(directory, STATE_FILE_NAME)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls(path, data)
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, TypeError) as exc:
            return cls(path, _set_aside(path, exc))

    def etag_for(self, pipeline_id, entry):
        """The ETag to send, only if the cache still holds exactly what it named."""
        known = self.etags.get(pipeline_id)
        if known and entry and entry["source"] == "cloud" and \
                entry["sha256"] == known.get("sha256"):
            return known.get("etag")
        return None

    def save(self):
        """Write atomically, and only when something changed (spares the SD card)."""
        text = self._text()
        if text == self._saved:
            return
        atomic_write(self.path, text.encode("utf-8"), mode=0o600)
        self._saved = text

    def _text(self):
        data = {"cursor": self.cursor, "etags": self.etags, "pins": self.pins,
                "refused": self.refused, "registered": self.registered}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _set_aside(path, exc):
    """A damaged state file is moved aside, never trusted; sync starts over from cursor 0
    (ETags make that cheap). Its pins are lost, so say so loudly."""
    aside = "%s.corrupt-%d" % (path, int(time.time()))
    try:
        os.replace(path, aside)
    except OSError:
        aside = None
    log.warning("sync state %s is unreadable (%s); moved to %s and starting over: every "
                "pipeline is re-checked, and pins must be set again", path, exc, aside)
    return {}


def pin_pipeline(runtime, pipeline_id, wait_lock_s=DEFAULT_WAIT_LOCK_S):
    """Keep ``pipeline_id`` at its cached version: sync will not replace or delete it."""
    entry = runtime.pipelines.entry(pipeline_id)
    if entry is None:
        raise NotFoundError("pipeline %s is not cached on this device, so there is no "
                            "version to pin: `fm-edge list` shows the cached ones"
                            % pipeline_id)
    with _LockedState(runtime, wait_lock_s) as state:
        state.pins[pipeline_id] = entry["version"]
    return entry["version"]


def unpin_pipeline(runtime, pipeline_id, wait_lock_s=DEFAULT_WAIT_LOCK_S):
    """Follow the cloud again; the next pass re-reads the feed so no change is missed."""
    with _LockedState(runtime, wait_lock_s) as state:
        was_pinned = state.pins.pop(pipeline_id, None) is not None
        if was_pinned:
            state.cursor = 0
    return was_pinned


class _LockedState:
    """The sync state, read and written under the sync lock (pins must not race a pass)."""

    def __init__(self, runtime, wait_lock_s):
        self.lock = SyncLock(runtime.config.data_dir)
        self.directory = runtime.pipelines.cache_dir
        self.wait_lock_s = wait_lock_s

    def __enter__(self):
        if not self.lock.acquire(self.wait_lock_s):
            raise self.lock.busy_error(self.wait_lock_s)
        self.state = SyncState.load(self.directory)
        return self.state

    def __exit__(self, exc_type, *rest):
        try:
            if exc_type is None:
                self.state.save()
        finally:
            self.lock.release()


# == The pass ==================================================================================

@dataclass
class PassOutcome:
    """How a pass (or one step of it) ended: ``errors`` in the order they happened."""

    errors: List[FmEdgeError] = field(default_factory=list)
    at_ping: bool = False     # it failed at its first request: the cloud never answered

    @property
    def ok(self):
        return not self.errors

    @property
    def error(self):
        """The failure that decides status and retry: a lost link or key beats the rest."""
        for kind in ("auth", "offline"):
            for err in self.errors:
                if failure_kind(err) == kind:
                    return err
        return self.errors[0] if self.errors else None


class SyncPass:
    """The blocking work of sync against one cloud, for one device's stores.

    ``stop`` (a threading.Event, optional) is checked between requests so a shutdown
    does not wait for a long queue to drain.
    """

    def __init__(self, client, results, pipelines, *, device_info, counters=None,
                 batch_size=MAX_BATCH_RESULTS, disk_path=None, stop=None):
        if not 1 <= batch_size <= MAX_BATCH_RESULTS:
            raise UsageError("batch_size %r is out of range: use 1 to %d results"
                             % (batch_size, MAX_BATCH_RESULTS))
        self.client = client
        self.results = results
        self.pipelines = pipelines
        self.device_info = dict(device_info)
        self.device_id = client.device_id
        self.counters = counters if counters is not None else SyncCounters()
        self.batch_size = batch_size
        self.disk_path = disk_path or results.store_dir
        self.stop = stop
        self.last_error = None
        self._validate = _cache_validator(pipelines)

    # -- the whole pass ------------------------------------------------------------------------

    def run(self, status="online", ping=True):
        """ping → register → results → pipelines → heartbeat; returns a PassOutcome.

        ``ping=False`` when the caller has just pinged (the manager does, to set status).
        """
        outcome = PassOutcome()
        try:
            if ping:
                self.ping()
            self.ensure_registered(outcome)
        except FmEdgeError as err:
            return self._failed(outcome, err)
        for step in (self.upload_results, self.pull_pipelines):
            try:
                step()
            except FmEdgeError as err:
                self._failed(outcome, err)
                if ends_pass(err):
                    return outcome
        try:
            self.heartbeat(status)
        except FmEdgeError as err:
            self._failed(outcome, err)
        return outcome

    def _failed(self, outcome, err):
        outcome.errors.append(err)
        self.last_error = err
        return outcome

    def _stopped(self):
        return self.stop is not None and self.stop.is_set()

    def _call(self, function, *args):
        """One request; every failure is counted before it propagates."""
        try:
            return function(*args)
        except FmEdgeError:
            self.counters.add("failed_attempts")
            raise

    # -- ping, registration, heartbeat -----------------------------------------------------------

    def ping(self):
        try:
            return self._call(self.client.ping)
        except NotFoundError as err:
            raise ConfigError("cloud_url %s does not serve the fm-edge sync API (%s): check "
                              "cloud_url (`fm-edge config get cloud_url`)"
                              % (self.client.base_url, err)) from err

    def ensure_registered(self, outcome=None):
        """Register once per device, fm-edge version and cloud (remembered in the state)."""
        state = SyncState.load(self.pipelines.cache_dir)
        wanted = {"device_id": self.device_id, "version": self.device_info.get("version"),
                  "cloud": self.client.base_url}
        if state.registered == wanted:
            return
        try:
            self._call(self.client.register, self.device_info)
        except FmEdgeError as err:
            if ends_pass(err) or outcome is None:
                raise
            # Results and pipelines do not need it: say so, and try again next pass.
            log.warning("device registration failed (%s); sync goes on and registers on the "
                        "next pass", err)
            outcome.errors.append(err)
            return
        state.registered = wanted
        state.save()
        log.info("registered device %s with the cloud at %s", self.device_id,
                 self.client.base_url)

    def heartbeat(self, status="online"):
        payload = self._heartbeat_payload(status)
        try:
            return self._call(self.client.heartbeat, payload)
        except NotFoundError:
            # The cloud forgot this device (a new studio database): register again.
            state = SyncState.load(self.pipelines.cache_dir)
            state.registered = None
            state.save()
            self.ensure_registered()
            return self._call(self.client.heartbeat, payload)

    def _heartbeat_payload(self, status):
        stats = self.results.stats()
        versions = self.pipelines.versions()
        shown = dict(sorted(versions.items())[:HEARTBEAT_MAX_PIPELINES])
        return {"status": str(status), "version": self.device_info.get("version"),
                "queue_depth": stats["pending"], "quarantined": stats["quarantined"],
                "disk_free_bytes": free_bytes(self.disk_path), "pipelines": shown,
                "pipelines_total": len(versions), "counters": self.counters.as_dict(),
                "last_error": str(self.last_error) if self.last_error else None}

    # -- results up ----------------------------------------------------------------------------

    def upload_results(self):
        """Send every pending result, oldest first, one page in memory at a time."""
        after = 0
        while not self._stopped():
            page = self.results.pending_texts(self.batch_size, after)
            if not page:
                return
            batch, after = self._batch_from(page, after)
            if batch:
                self._send(batch)

    def _batch_from(self, page, after):
        """[(result, json_text)] within the byte budget, and the last row it covers."""
        batch, size = [], 0
        for seq, run_id, stored in page:
            try:
                row, text = _strict_json(run_id, stored)
            except (TypeError, ValueError) as exc:
                self._quarantine_locally(run_id, "the result cannot be sent as JSON "
                                         "(%s)" % exc)
                after = seq
                continue
            if batch and size + len(text) > RAW_BATCH_BUDGET:
                break
            batch.append((row, text))
            size += len(text)
            after = seq
        return batch, after

    def _send(self, batch):
        items = [item for item, _ in batch]
        texts = [text for _, text in batch]
        try:
            answer = self._call(self.client.upload_results, items, batch_key(batch), texts)
        except UsageError as err:
            if getattr(err, "code", "") != "batch_too_large":
                raise
            self._split(batch, err)
            return
        self._apply(items, answer)

    def _split(self, batch, err):
        if len(batch) == 1:
            self._quarantine_locally(batch[0][0]["run_id"], "the result alone is over the "
                                     "cloud's size limit per request (%s)" % err)
            return
        middle = len(batch) // 2
        self._send(batch[:middle])
        self._send(batch[middle:])

    def _apply(self, items, answer):
        """Mark synced exactly what the cloud acknowledged; quarantine what it refused."""
        ids = [item["run_id"] for item in items]
        sent = set(ids)
        accepted = [run_id for run_id in answer["accepted"] if run_id in sent]
        duplicate = [run_id for run_id in answer["duplicate"] if run_id in sent]
        acknowledged = set(accepted) | set(duplicate)
        if acknowledged:
            self.results.mark_synced_now(list(acknowledged))
        rejected = 0
        for refusal in answer["rejected"]:
            run_id = _rejected_run_id(refusal, ids)
            if run_id in sent and run_id not in acknowledged:
                self.results.quarantine_now(run_id, refusal.get("reason") or "no reason given")
                rejected += 1
        replayed = answer.get("replayed", False)
        # A replayed answer repeats what the cloud took on an earlier try whose answer
        # was lost: nothing new arrived now, so it counts as duplicate, not uploaded.
        self.counters.add("duplicate", len(duplicate) + (len(accepted) if replayed else 0))
        self.counters.add("uploaded", 0 if replayed else len(accepted))
        self.counters.add("rejected", rejected)
        self.counters.add("batches")
        self.counters.add("replayed_batches", 1 if replayed else 0)

    def _quarantine_locally(self, run_id, reason):
        if self.results.quarantine_now(run_id, reason):
            self.counters.add("quarantined_locally")

    # -- pipelines down ------------------------------------------------------------------------

    def pull_pipelines(self):
        """Apply the cloud's pipeline changes since the saved cursor."""
        state = SyncState.load(self.pipelines.cache_dir)
        try:
            while not self._stopped():
                page = self._call(self.client.pipeline_changes, state.cursor)
                if page.get("reset"):
                    log.warning("the cloud restarted its pipeline feed (a new database?): "
                                "re-checking every pipeline")
                for change in page["changes"]:
                    if self._stopped():
                        return
                    self._apply_change(change, state)
                state.cursor = page["cursor"]
                if not page.get("more") or not page["changes"]:
                    return
        finally:
            state.save()   # keep whatever progress was made, even on a broken link

    def _apply_change(self, change, state):
        pipeline_id = change["id"]
        version = change.get("version")
        if not is_valid_id(pipeline_id):
            self._refuse(state, pipeline_id, version, change.get("sha256"),
                         "the id %r is not a safe pipeline id" % (pipeline_id,))
            return
        if pipeline_id in state.pins:
            self.counters.add("pipelines_pinned")
            log.info("pipeline %s is pinned at version %s: cloud change to %s not applied",
                     pipeline_id, state.pins[pipeline_id], version)
            return
        entry = self.pipelines.entry(pipeline_id)
        if change.get("deleted"):
            self._delete(pipeline_id, entry, state)
            return
        if entry is not None and entry["source"] == "local":
            self.counters.add("pipelines_kept_local")
            log.warning("pipeline %s was added on this device; the cloud's version %s is not "
                        "applied over it: `fm-edge remove %s` to follow the cloud",
                        pipeline_id, version, pipeline_id)
            return
        try:
            download = self._call(self.client.get_pipeline, pipeline_id,
                                  state.etag_for(pipeline_id, entry))
        except NotFoundError:
            log.info("pipeline %s vanished from the cloud while syncing; its deletion will "
                     "come through the feed", pipeline_id)
            return
        if download is None:
            self.counters.add("pipelines_unchanged")
            return
        self._install(pipeline_id, download, version, entry, state)

    def _install(self, pipeline_id, download, listed_version, entry, state):
        version = download.version or listed_version
        try:
            document = parse_document(download.body, pipeline_id)
            self._validate(document, pipeline_id)
            stored = self.pipelines.store_now(pipeline_id, document, source="cloud",
                                              version=version)
        except (PipelineValidationError, InvalidIdError) as err:
            self._refuse(state, pipeline_id, version, download.sha256, str(err), entry)
            return
        state.etags[pipeline_id] = {"etag": download.sha256, "sha256": stored["sha256"]}
        state.refused.pop(pipeline_id, None)
        if entry is not None and entry["sha256"] == stored["sha256"]:
            self.counters.add("pipelines_unchanged")
            return
        self.counters.add("pipelines_updated")
        log.info("pipeline %s updated from the cloud to version %s (was %s)", pipeline_id,
                 stored["version"], entry["version"] if entry else "not cached")

    def _refuse(self, state, pipeline_id, version, sha256, reason, entry=None):
        self.counters.add("pipelines_refused")
        state.refused[pipeline_id] = {"version": version, "sha256": sha256, "reason": reason,
                                      "at": time.time()}
        keeps = ("version %s keeps running" % entry["version"]) if entry else \
            "it is not cached, so it cannot run here"
        log.warning("pipeline %s version %s from the cloud was refused: %s; %s",
                    pipeline_id, version, reason, keeps)

    def _delete(self, pipeline_id, entry, state):
        state.etags.pop(pipeline_id, None)
        state.refused.pop(pipeline_id, None)
        if entry is None:
            return
        if entry["source"] != "cloud":
            self.counters.add("pipelines_kept_local")
            log.info("pipeline %s was deleted in the cloud but was added on this device "
                     "(source %s): kept", pipeline_id, entry["source"])
            return
        self.pipelines.remove_now(pipeline_id)
        self.counters.add("pipelines_deleted")
        log.info("pipeline %s deleted: it was removed from the cloud", pipeline_id)


# == Helpers ===================================================================================

def _strict_json(run_id, stored):
    """({"run_id": ...}, the JSON text to send) for a stored result.

    The stored text is sent as it is unless it may hold NaN/Infinity (which the store's
    encoder allows and the protocol does not): then it is re-encoded strictly, which
    raises ValueError for a result that cannot be sent.
    """
    if "NaN" in stored or "Infinity" in stored:
        stored = json.dumps(json.loads(stored), separators=(",", ":"), allow_nan=False)
    return {"run_id": run_id}, stored


def batch_key(batch):
    """Idempotency-Key of a batch: its run ids and their exact bytes, hashed.

    The same pending rows always give the same key, so a resend after a crash or a lost
    answer is replayed by the cloud; different content under the same run ids (a result
    re-saved) gets a new key instead of a 422 for a reused one.
    """
    digest = hashlib.sha256()
    for item, _ in batch:
        digest.update(item["run_id"].encode("utf-8") + b"\n")
    for _, text in batch:
        digest.update(text.encode("utf-8"))
    return "fmedge-batch-" + digest.hexdigest()


def _rejected_run_id(refusal, ids):
    run_id = refusal.get("run_id")
    if isinstance(run_id, str):
        return run_id
    index = refusal.get("index")
    if isinstance(index, int) and 0 <= index < len(ids):
        return ids[index]
    return None


def parse_document(body, pipeline_id):
    """Strict JSON for documents from the network: no NaN, no duplicate keys."""
    try:
        return loads_strict(body, "the document from the cloud")
    except ValueError as exc:
        raise PipelineValidationError("pipeline %s: %s; fix it in the Studio"
                                      % (pipeline_id, exc)) from None


def _cache_validator(pipelines):
    """The engine's full validation, whatever validator the cache itself was given."""
    from ..runtime import pipeline_validator

    def lookup(pipeline_id):
        return pipelines.get_now(pipeline_id) if is_valid_id(pipeline_id) else None
    return pipeline_validator(lookup)


def device_info(config, device_id):
    """What registration tells the cloud about this device."""
    from .. import __version__
    from ..device import device_name

    return {"device_id": device_id, "name": device_name(config), "version": __version__,
            "platform": platform.platform(terse=True), "machine": platform.machine(),
            "python": platform.python_version(),
            "capabilities": {"llm_backend": config.llm_backend, "sync_protocol": 1}}


def open_sync_pass(config, *, results=None, pipelines=None, device_id=None, client=None,
                   counters=None, batch_size=MAX_BATCH_RESULTS, stop=None):
    """A SyncPass plus a ``close()`` for what it had to open itself (stores, client)."""
    from ..device import ensure_device_id
    from .client import CloudClient

    owned = []
    if results is None or pipelines is None:
        from ..runtime import EdgeRuntime

        runtime = EdgeRuntime(config)
        owned.append(runtime)
        results = results if results is not None else runtime.results
        pipelines = pipelines if pipelines is not None else runtime.pipelines
    device_id = device_id or ensure_device_id(config)
    if client is None:
        client = CloudClient(config.cloud_url, config.api_key, device_id,
                             ca_bundle=config.ca_bundle or None)
        owned.append(client)
    sync = SyncPass(client, results, pipelines, device_info=device_info(config, device_id),
                    counters=counters, batch_size=batch_size, disk_path=config.data_dir,
                    stop=stop)
    return sync, _Closer(owned)


class _Closer:
    def __init__(self, owned):
        self.owned = owned

    def close(self):
        while self.owned:
            self.owned.pop().close()


# == Cron: one pass with a report ===============================================================

NOT_CONFIGURED = ("no cloud_url is configured, so there is nothing to sync with: set it with "
                  "`fm-edge config set cloud_url https://studio.example.com` and `fm-edge "
                  "config set api_key KEY`")


@dataclass
class SyncReport:
    """What ``fm-edge sync`` prints (``to_dict()`` for ``--json``) and exits with."""

    exit_code: int
    outcome: str                  # synced | offline | busy | auth_failed | not_configured | error
    message: str
    counters: dict = field(default_factory=dict)
    pending: Optional[int] = None
    quarantined: Optional[int] = None
    errors: List[str] = field(default_factory=list)
    error_code: Optional[str] = None
    retry_after: Optional[float] = None
    refused_pipelines: dict = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def ok(self):
        return self.exit_code == EXIT_OK

    def to_dict(self):
        return {"ok": self.ok, "exit_code": self.exit_code, "outcome": self.outcome,
                "message": self.message, "counters": dict(self.counters),
                "pending": self.pending, "quarantined": self.quarantined,
                "errors": list(self.errors), "error_code": self.error_code,
                "retry_after": self.retry_after,
                "refused_pipelines": dict(self.refused_pipelines),
                "duration_s": round(self.duration_s, 3)}

    def to_text(self):
        return self.message


_OUTCOMES = {EXIT_OK: "synced", EXIT_OFFLINE: "offline", EXIT_BUSY: "busy",
             EXIT_AUTH: "auth_failed"}


def sync_once(runtime, *, wait_lock_s=DEFAULT_WAIT_LOCK_S, batch_size=MAX_BATCH_RESULTS,
              client=None):
    """One pass (results, then pipelines) for cron, under the cross-process sync lock.

    Never raises for the cloud or the lock: the report's ``exit_code`` says what
    happened (0 synced or nothing to do, 2 no cloud_url / bad config, 3 cloud unreachable
    or unavailable, 4 another sync holds the lock, 5 api_key refused).
    """
    started = time.monotonic()
    config = runtime.config
    if not config.cloud_url:
        return SyncReport(EXIT_USAGE, "not_configured", NOT_CONFIGURED,
                          error_code="not_configured")
    lock = SyncLock(config.data_dir)
    try:
        if not lock.acquire(wait_lock_s):
            return _error_report(lock.busy_error(wait_lock_s), started)
        try:
            return _locked_pass(runtime, batch_size, client, started)
        finally:
            lock.release()
    except FmEdgeError as err:   # the lock file or the stores could not be opened
        return _error_report(err, started)


def _locked_pass(runtime, batch_size, client, started):
    sync, closer = open_sync_pass(runtime.config, results=runtime.results,
                                  pipelines=runtime.pipelines, device_id=runtime.device_id,
                                  client=client, batch_size=batch_size)
    try:
        outcome = sync.run()
        report = _pass_report(sync, outcome, started)
    finally:
        closer.close()
    return report


def _pass_report(sync, outcome, started):
    stats = sync.results.stats()
    counters = sync.counters.as_dict()
    err = outcome.error
    code = exit_code_for(err)
    if err is None:
        message = _synced_message(counters, stats)
    else:
        message = "sync did not finish: %s; %d results stay queued" % (err, stats["pending"])
    state = SyncState.load(sync.pipelines.cache_dir)
    return SyncReport(code, _OUTCOMES.get(code, "error"), message, counters=counters,
                      pending=stats["pending"], quarantined=stats["quarantined"],
                      errors=[str(e) for e in outcome.errors],
                      error_code=getattr(err, "code", None) if err else None,
                      retry_after=getattr(err, "retry_after", None) if err else None,
                      refused_pipelines=state.refused,
                      duration_s=time.monotonic() - started)


def _synced_message(counters, stats):
    parts = ["synced: %d results uploaded" % counters["uploaded"]]
    if counters["duplicate"]:
        parts.append("%d already in the cloud" % counters["duplicate"])
    if counters["rejected"] or counters["quarantined_locally"]:
        parts.append("%d refused (quarantined)" % (counters["rejected"] +
                                                   counters["quarantined_locally"]))
    parts.append("pipelines: %d updated, %d deleted" % (counters["pipelines_updated"],
                                                       counters["pipelines_deleted"]))
    if counters["pipelines_refused"]:
        parts.append("%d refused (invalid; previous versions kept)"
                     % counters["pipelines_refused"])
    parts.append("%d results pending" % stats["pending"])
    return ", ".join(parts)


def _error_report(err, started):
    code = exit_code_for(err)
    return SyncReport(code, _OUTCOMES.get(code, "error"), str(err), errors=[str(err)],
                      error_code=getattr(err, "code", None),
                      retry_after=getattr(err, "retry_after", None),
                      duration_s=time.monotonic() - started)
