"""EdgeExecutor: runs cached (or given) pipelines within the device's limits.

The seed's API: ``await EdgeExecutor(config).execute(pipeline_id=..., inputs=...)`` returns
an :class:`ExecutionResult` with ``status``, ``output`` and ``duration_ms`` (plus
``run_id``, ``error``, per-stage records and usage). Limits (design §6):

* at most ``max_concurrent`` runs at once; up to ``max_queued_runs`` more wait for a slot;
  past that the caller gets BusyError (HTTP 429);
* ``execution_timeout`` bounds a whole run, ``timeout_ms`` each stage attempt; both cancel
  the work itself (an LLM generation included), not just the wait for it;
* each run is recorded in the ResultStore when it is queued (``pending``) or when it
  first waits (``running``), and durably when it ends, before its caller gets the
  result: a crash leaves an ``interrupted`` record, never a lost run. A run that never
  waits (quick stages only) starts and ends in one go (one step of the event loop, or in
  the HTTP worker that started it), where no crash can split it from its final record,
  so it writes only that one. The first
  record is queued without waiting and without its own fsync (nobody has been told
  about the run yet; POST /run flushes the store before its 202); the run slot is given
  back before the final record's group commit, which needs none.
"""

import asyncio
import logging
import os
import random
import threading
import time

from ..cache.results import UNFINISHED
from ..config import EdgeConfig
from ..errors import BusyError, FmEdgeError, NotFoundError, UsageError
from ..ids import new_run_id, validate_id
from .document import canonical_json, parse_pipeline
from .inputs import apply_input_schema
from .result import CANCELLED, COMPLETED, RUN_FAILED, SUCCESS, TIMEOUT, ExecutionResult
from .run import PipelineRun, RunState, StageFailure, in_loop, reference_error_name, start
from .services import Services
from .slots import WAIT, Slots

log = logging.getLogger("fmedge.executor")
_PARSED_CACHE_SIZE = 64    # pipeline ids (and names) whose parsed documents are kept
_VERSIONS_PER_ID = 4       # parsed documents kept per id: a few versions may alternate


class EdgeExecutor:
    """Runs pipelines; share one per process so the concurrency limits hold."""

    def __init__(self, config=None, *, pipelines=None, results=None, llm=None,
                 device_id=None, clock=time.time, rng=None, record=True):
        self.config = config or EdgeConfig.load()
        self._pipelines = pipelines
        self._results = results
        self.llm = llm
        self._device_id = device_id
        self.clock = clock
        self.rng = rng or random.Random()
        self.record = record
        self._active = {}          # run_id -> asyncio.Task of the run body
        self._cancelled = set()
        self._slots = None
        self._lock = threading.Lock()
        self.counters = {"runs": 0, "retries": 0, "rejected_busy": 0}
        self._adapters = {}
        self._parsed = {}

    # -- stores (opened on first use, from the config) ---------------------------------

    @property
    def pipelines(self):
        if self._pipelines is None:
            from ..runtime import EdgeRuntime

            self._pipelines = EdgeRuntime(self.config).pipelines
        return self._pipelines

    @property
    def results(self):
        if self._results is None and self.record:
            from ..runtime import EdgeRuntime

            self._results = EdgeRuntime(self.config).results
        return self._results

    @property
    def device_id(self):
        if self._device_id is None:
            from ..device import ensure_device_id

            self._device_id = ensure_device_id(self.config)
        return self._device_id

    @property
    def queue_depth(self):
        return self.slots.queued

    @property
    def running(self):
        return self.slots.running

    # -- running ------------------------------------------------------------------------

    async def execute(self, pipeline_id=None, inputs=None, *, document=None, run_id=None,
                      timeout=None, on_recorded=None):
        """Run a cached pipeline (or ``document``) with ``inputs``; returns the result.

        Raises UsageError/NotFoundError for bad requests (nothing recorded) and BusyError
        when the queue is full. A run that starts always returns a result, whatever
        happens inside it: failures are in ``status``/``error``.

        ``on_recorded(result, payload)`` is for callers in other threads (the HTTP API):
        the final record is then queued without waiting, execute returns at once, and the
        store's writer thread calls it when the record is durable, with the record's JSON
        text (None when it could not be recorded: ``result.record_error`` says why).
        Nobody may learn of the result before that call.

        It may also be driven from a thread without an event loop (``run.drive``, as the
        HTTP API's workers do): a pipeline whose stages never wait then runs entirely in
        that thread, sparing it two thread hand-offs, and anything that waits (a slot,
        a stage, a long run's pause) moves the run to the loop first (``in_loop``).
        """
        pipeline = await self.load(pipeline_id, document)
        inputs = apply_input_schema(pipeline, inputs)
        run_id = validate_id(run_id, "run") if run_id else new_run_id()
        async with _Slot(self, self._pending_record(pipeline, inputs, run_id)) as slot:
            return await self._run(pipeline, inputs, run_id, timeout, slot=slot,
                                   on_recorded=on_recorded)

    def _pending_record(self, pipeline, inputs, run_id):
        """What a run that must wait for a slot writes: once a caller has been told
        "accepted", the run is on disk (`pending`), and a crash leaves it `interrupted`
        and a cancellation `cancelled`, never lost."""
        def record(status, error=None):
            result = ExecutionResult(
                run_id=run_id, pipeline_id=pipeline.id, pipeline_version=pipeline.version,
                status=status, error=error, inputs=inputs, started_at=self.clock(),
                device_id=self.device_id)
            if status == "pending":
                return self._record_start(result)
            result.finished_at = self.clock()
            return self._save(result)
        return record

    async def load(self, pipeline_id=None, document=None):
        """The parsed pipeline: ``document`` if given, else the cached one, else a bundled
        example of that id."""
        if document is None:
            if not pipeline_id:
                raise UsageError("give a pipeline id or a pipeline document to run")
            validate_id(pipeline_id, "pipeline")
            # Read here, not in a worker thread: a point read of a WAL database never
            # waits for other processes, and two thread hand-offs per run cost more.
            document = self.pipelines.get_now(pipeline_id)
            if document is None:
                from ..examples import example

                document = example(pipeline_id)   # the bundled examples, when not cached
            if document is None:
                raise NotFoundError(f"pipeline {pipeline_id} is not cached on this device: "
                                    "add it with `fm-edge add FILE` or sync it from the cloud")
        pipeline = self._parse(document, pipeline_id)
        if pipeline.abstract:
            raise UsageError(f"pipeline {pipeline.id} is abstract: it can only be extended; "
                             "run a pipeline that extends it")
        return pipeline

    def _parse(self, document, pipeline_id):
        """Parse and validate, reusing the result for an identical document: a device
        runs the same few pipelines over and over."""
        if not isinstance(document, dict) or document.get("extends"):
            # A child's meaning depends on its parents, which may change: parse anew.
            return parse_pipeline(document, pipeline_id=pipeline_id,
                                  lookup=self._lookup_parent)
        # Compared, not serialised: == on a few dicts is C speed, a canonical dump is not.
        key = (pipeline_id, _text(document.get("id")), _text(document.get("name")))
        parsed = self._parsed.get(key, ())
        for snapshot, pipeline in parsed:
            if document == snapshot:
                return pipeline
        try:
            snapshot = _snapshot(document)
        except (_NotJson, RecursionError):
            canonical_json(document)   # raises for what JSON cannot hold, as it always did
            return parse_pipeline(document, pipeline_id=pipeline_id)
        pipeline = parse_pipeline(document, pipeline_id=pipeline_id)
        with self._lock:     # runs start in several threads (see execute)
            if key not in self._parsed and len(self._parsed) >= _PARSED_CACHE_SIZE:
                self._parsed.pop(next(iter(self._parsed)))
            kept = tuple(parsed)[:_VERSIONS_PER_ID - 1]
            self._parsed[key] = ((snapshot, pipeline),) + kept
        return pipeline

    def _lookup_parent(self, parent_id):
        from ..ids import is_valid_id

        return self.pipelines.get_now(parent_id) if is_valid_id(parent_id) else None

    async def cancel(self, run_id):
        """Cancel a running run; True if it was running here."""
        if run_id not in self._active:
            return False
        task = self._active[run_id]
        if task is not None and task.done():
            return False
        self._cancelled.add(run_id)
        if task is not None:
            task.cancel()
        return True

    # -- slots --------------------------------------------------------------------------

    @property
    def slots(self):
        if self._slots is None:
            with self._lock:
                if self._slots is None:
                    self._slots = Slots(self.config.max_concurrent)
        return self._slots

    def count(self, name):
        with self._lock:     # runs start in several threads (see execute)
            self.counters[name] += 1

    # -- one run ------------------------------------------------------------------------

    async def _run(self, pipeline, inputs, run_id, timeout, depth=0, slot=None,
                   on_recorded=None):
        result = ExecutionResult(run_id=run_id, pipeline_id=pipeline.id,
                                 pipeline_version=pipeline.version, inputs=inputs,
                                 started_at=self.clock(), device_id=self.device_id)
        state = RunState(run_id, pipeline, inputs, self.config, self.device_id,
                         self._allowed_env(), depth)
        services = Services(self, state, result)
        run = PipelineRun(state, services, rng=self.rng, clock=self.clock)
        self._active[run_id] = None     # cancellable from here on
        self.count("runs")
        limit = self.config.execution_timeout if timeout is None else timeout
        try:
            await self._wait(run, limit, result, depth)
        finally:
            self._active.pop(run_id, None)
            self._cancelled.discard(run_id)
            self._finish(result, run, pipeline)
            if depth == 0:
                if slot is not None:
                    # Recording needs no run slot: the next run starts while this one's
                    # record waits for its (group) commit.
                    slot.release()
                if on_recorded is not None:
                    self._queue_final(result, on_recorded)
                elif self.results is not None:   # no store: no task for a no-op
                    await in_loop()
                    await asyncio.shield(self._save(result))
        return result

    async def _wait(self, run, limit, result, depth):
        run_id = result.run_id
        try:
            await self._run_body(run, limit, result, depth)
            result.status = COMPLETED
        except asyncio.TimeoutError:
            result.status, result.error_type = TIMEOUT, "TimeoutExecutionError"
            result.error = (f"run exceeded its time limit of {limit:g} s "
                            "(execution_timeout); the running stages were stopped")
        except asyncio.CancelledError:
            result.status, result.error = CANCELLED, "the run was cancelled"
            if run_id not in self._cancelled:
                raise   # our caller was cancelled (shutdown): record, then let it through
        except StageFailure as failure:
            result.status, result.failed_stage = RUN_FAILED, failure.stage_id
            result.error = str(failure.error)
            result.error_type = reference_error_name(failure.error)
        except FmEdgeError as error:
            result.status, result.error = RUN_FAILED, str(error)
            result.error_type = reference_error_name(error)

    async def _run_body(self, run, limit, result, depth):
        """The run's stages, as a task under the run's time limit once they first wait. Until
        then they run here: with no wait there is nothing to time out or cancel, and a long
        stretch of quick stages pauses now and then (PipelineRun.pause). A top-level run
        records its start when it first waits: before that, nobody could see it."""
        started = time.monotonic()
        run_id = result.run_id
        if not run.plan.never_waits:
            await in_loop()             # in another thread: what waits needs the loop
        body = run.run()
        if run_id not in self._cancelled:
            finished, body = start(body)
            if finished:
                return
        await in_loop()                 # a quick run that runs long pauses in the loop
        if depth == 0:
            self._record_start(result)
        task = asyncio.ensure_future(body)
        self._active[run_id] = task
        if run_id in self._cancelled:
            task.cancel()               # cancelled while its start was being recorded
        await asyncio.wait_for(task, max(0.0, limit - (time.monotonic() - started)))

    def _finish(self, result, run, pipeline):
        result.finished_at = self.clock()
        result.stages = dict(run.records)
        for record in run.records.values():
            usage = record.usage_so_far
            if usage is not None:
                result.usage.merge(usage)
        result.output_stage_id, result.output = _output(run, pipeline)

    async def run_child(self, pipeline_id, inputs, depth, version=None):
        """A subpipeline: runs inside its parent's slot, recorded inside its parent."""
        pipeline = await self.load(pipeline_id)
        if version and str(version) != str(pipeline.version):
            raise NotFoundError(f"subpipeline {pipeline_id} version {version} is not cached "
                                f"(cached: {pipeline.version})")
        inputs = apply_input_schema(pipeline, inputs)
        return await self._run(pipeline, inputs, new_run_id(), None, depth=depth)

    def _record_start(self, result):
        """Queue a run's first record (pending or running) without waiting for it: it is
        committed before the run's later records (queue order), without its own fsync
        (nobody has been told about the run yet; POST /run flushes before its 202)."""
        store = self.results
        if store is None:
            return
        try:
            future = store.queue_save(result.run_id, result.to_dict(), durable=False)
        except FmEdgeError as error:
            log.error("run %s: could not record its start: %s", result.run_id, error)
            return
        future.add_done_callback(lambda done: _log_start_failure(result.run_id, done))

    def _queue_final(self, result, on_recorded):
        """Queue the final record; ``on_recorded`` hears (in the writer thread) when it is
        durable, or that it could not be written."""
        def done(outcome, payload):
            if isinstance(outcome, BaseException):
                _record_failed(result, outcome)
                payload = None
            on_recorded(result, payload)

        store = self.results
        if store is None:
            on_recorded(result, None)
            return
        try:
            store.queue_save(result.run_id, result.to_dict(),
                             durable=result.status not in UNFINISHED, on_done=done)
        except FmEdgeError as error:
            done(error, None)

    async def _save(self, result):
        store = self.results
        if store is None:
            return
        try:
            # Group-committed with other runs' records. A run's first records (pending,
            # running) skip their own fsync: nobody has been told about the run yet, and
            # whoever tells first (POST /run's 202) flushes the store before it does. The
            # final record is durable before the caller gets the result.
            await store.save(result.run_id, result.to_dict(),
                             durable=result.status not in UNFINISHED)
        except FmEdgeError as error:
            _record_failed(result, error)

    def _allowed_env(self):
        """Only variables named in ``env_allowlist``: cloud pipelines must not read keys."""
        return {name: os.environ[name] for name in self.config.env_allowlist
                if name in os.environ}

    def adapter_for(self, stage, model=None):
        """The LLM adapter a stage uses: the injected one, or one built from the config."""
        if self.llm is not None:
            return self.llm(stage, model) if callable(self.llm) and not hasattr(
                self.llm, "generate") else self.llm
        from ..adapters.factory import create_adapter

        key = model or stage.model or ""
        if key not in self._adapters:
            self._adapters[key] = create_adapter(self.config, model=key or None)
        return self._adapters[key]

    async def close(self):
        for adapter in self._adapters.values():
            await adapter.close()
        self._adapters.clear()


class _Slot:
    """``async with``: take a run slot, wait for one (in the event loop), or refuse at
    once when the queue is full."""

    def __init__(self, executor, record=None):
        self.executor = executor
        self.record = record            # record(status), for a queued run
        self._held = False

    async def __aenter__(self):
        executor = self.executor
        slots = executor.slots
        admitted = slots.admit(executor.config.max_queued_runs)
        if admitted is None:
            executor.count("rejected_busy")
            raise BusyError(f"busy: {slots.running} runs executing and {slots.queued} "
                            f"waiting (max_concurrent={executor.config.max_concurrent}, "
                            f"max_queued_runs={executor.config.max_queued_runs}); retry "
                            "shortly")
        if admitted == WAIT:
            await self._wait(slots)
        self._held = True
        return self

    async def _wait(self, slots):
        recorded = self.record is not None and self.executor.record
        try:
            await in_loop()                  # waiting needs the loop
            if recorded:
                self.record("pending")       # queued; the slot wait does not wait for it
        except BaseException:
            slots.leave()
            raise
        try:
            await slots.wait()
        except asyncio.CancelledError:
            if recorded:
                await asyncio.shield(self.record("cancelled", "cancelled while queued"))
            raise

    def release(self):
        """Give the slot back (at most once): before the end of the ``async with`` when
        the run is done and only its record remains to be written."""
        if self._held:
            self._held = False
            self.executor.slots.give_back()

    async def __aexit__(self, *exc):
        self.release()
        return False


def _record_failed(result, error):
    # The run itself is not lost from the caller's view; the record is. Say so.
    log.error("run %s: could not record the result: %s", result.run_id, error)
    result.record_error = str(error)


def _log_start_failure(run_id, done):
    if not done.cancelled() and done.exception() is not None:
        log.error("run %s: could not record its start: %s", run_id, done.exception())


def _text(value):
    return value if type(value) is str else None


class _NotJson(Exception):
    """A document holds a value JSON has no place for."""


def _snapshot(value):
    """A copy of a JSON document that is == only to an identical one: numbers and
    booleans compare with their type as well (1, 1.0 and true are different JSON)."""
    kind = type(value)
    if kind is str or value is None:
        return value
    if kind is dict:
        copy = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _NotJson(key)
            copy[key] = _snapshot(item)
        return copy
    if kind is list:
        return [_snapshot(item) for item in value]
    if kind in (bool, int, float):
        return _Exact(value)
    raise _NotJson(value)


class _Exact:
    """A number or boolean in a snapshot: equal only to the same type and spelling."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        if type(other) is not type(self.value):
            return False
        return repr(other) == repr(self.value) if type(other) is float else other == self.value

    __hash__ = None


def _output(run, pipeline):
    """The early return's value; else the output stage's; else the last declared result."""
    if run.early_return is not None:
        return run.returned_by, run.early_return.get("return_value")
    records = run.records
    chosen = pipeline.output_stage_id
    if chosen and chosen in records and records[chosen].status == SUCCESS:
        return chosen, records[chosen].output
    for stage in reversed(pipeline.stages):
        record = records.get(stage.id)
        if record is not None and record.status == SUCCESS:
            return stage.id, record.output
    return None, None
