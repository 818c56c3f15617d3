"""One run of one pipeline: waves, skips, stage attempts, and control-flow directives.

Scheduling follows the reference's wave rule (semantics §3.2): wave k holds the stages
whose deepest dependency is in wave k-1; a wave's stages run concurrently and each sees a
snapshot of the outputs recorded before its wave began, so results never depend on timing.
Control-flow components return a ``directive`` that this module acts on (§4.4).

Where the reference is broken, fm-edge fixes it (design §5, README "Deviations"):
branch skips are transitive for stages that depend only on skipped stages; ``enabled:
false`` skips; ``return`` makes its ``return_value`` the run's output; ``trycatch`` with
``continue`` swallows only the error types it names; foreach iterations each get their
own scope; cancellation and timeouts really stop the work.

What every run of a pipeline shares is worked out once (PipelinePlan, StagePlan): waves,
components, compiled templates, declared fields. A quick pure stage runs as a plain call
(``execute_now``), and stages run in the caller's task until one has to wait (``start``);
a long stretch without a wait pauses (``pause``) so time limits and cancellation still work.
"""

import asyncio
import logging
import random
import time

from ..errors import ExecutionError, ExpressionError, FmEdgeError, StageTimeoutError
from ..errors import TemplateError
from . import template
from .components import family_of, get_component
from .components.base import BreakLoop, ComponentError, LoopSignal, MappingError
from .components.base import StageContext
from .document import topological_waves
from .result import FAILED, SKIPPED, SUCCESS, StageRecord, skipped_marker

log = logging.getLogger("fmedge.executor")

_BRANCH_REASONS = ("control_flow", "disabled")


class RetryExhaustedError(ExecutionError):
    code = "retry_exhausted"
    reference_name = "RetryExhaustedError"


class StageFailure(Exception):
    """A stage failed for good: carries the stage id and the error that ended it."""

    def __init__(self, stage_id, error):
        super().__init__(f"stage {stage_id}: {error}")
        self.stage_id = stage_id
        self.error = error


def reference_error_name(error):
    """The reference's exception class name for ``error`` (what trycatch matches)."""
    if isinstance(error, RetryExhaustedError):
        return "RetryExhaustedError"
    if isinstance(error, StageTimeoutError):
        return "TimeoutExecutionError"
    if isinstance(error, (TemplateError, MappingError)) or getattr(
            error, "code", "") == "coercion_error":
        return "MappingExecutionError"
    return getattr(error, "reference_name", "ComponentExecutionError")


def error_names(error):
    """Every name a trycatch `catch_error_types` entry may use for ``error``."""
    names = {reference_error_name(error), type(error).__name__}
    code = getattr(error, "code", None)
    if code:
        names.add(code)
    cause = error.__cause__
    if cause is not None:
        names.add(type(cause).__name__)
    return names


class RunState:
    """What every stage of one run shares: ids, the input, variables, the config."""

    def __init__(self, run_id, pipeline, pipeline_input, config, device_id, env, depth=0):
        self.run_id = run_id
        self.pipeline = pipeline
        self.pipeline_id = pipeline.id
        self.pipeline_version = pipeline.version
        self.pipeline_input = pipeline_input
        self.config = config
        self.device_id = device_id
        self.env = env
        self.variables = {}
        self.depth = depth

    def context(self, stage_id, loop_vars=None):
        """``{{context.*}}``: ids, then variables set by variable_set, then loop variables."""
        values = {"run_id": self.run_id, "pipeline_id": self.pipeline_id,
                  "pipeline_version": self.pipeline_version, "stage_id": stage_id,
                  "device_id": self.device_id}
        values.update(self.variables)
        if loop_vars:
            values.update(loop_vars)
        return values


class PipelineRun:
    """Executes one parsed pipeline for one RunState; fills ``records`` as it goes."""

    def __init__(self, state, services, rng=None, clock=None):
        self.state = state
        self.pipeline = state.pipeline
        self.plan = pipeline_plan(state.pipeline)
        self.services = services
        self.rng = rng or random.Random()
        self.clock = clock
        self._now = services.now if clock is None else clock   # the same clock, one call less
        self.records = {}
        self.upstream = {}
        self.skip = {}              # stage id -> reason
        self.early_return = None    # the triggered return stage's output
        self.returned_by = None
        self.failure = None
        self._busy_since = time.monotonic()

    # -- the wave loop ------------------------------------------------------------------

    async def run(self):
        self._busy_since = time.monotonic()
        for wave in self.plan.waves:
            if self.early_return is not None:
                break
            snapshot = dict(self.upstream)
            if len(wave) == 1:        # nothing to run beside it: no task needed
                await self._dag_stage(wave[0], snapshot)
            else:
                await self._run_wave(wave, snapshot)
            if self.busy():
                await self.pause()

    def busy(self):
        """True after a long stretch of work without a wait (see ``pause``)."""
        return time.monotonic() - self._busy_since >= _MAX_BUSY_S

    async def pause(self):
        """Let the event loop run after a long stretch of work without a wait: quick stages
        never wait, and the run's time limit, a cancellation and other runs need the loop."""
        await asyncio.sleep(0)
        self._busy_since = time.monotonic()

    async def _run_wave(self, stages, snapshot):
        """Each stage of the wave runs until it first waits, in order, as under gather;
        only stages that do wait become tasks, so quick stages cost no task."""
        outcomes = [None] * len(stages)
        waiting = []
        for index, stage in enumerate(stages):
            try:
                finished, rest = start(self._dag_stage(stage, snapshot))
            except (Exception, asyncio.CancelledError) as error:
                outcomes[index] = error
                continue
            if not finished:
                waiting.append((index, asyncio.ensure_future(rest)))
        if waiting:
            results = await asyncio.gather(*(task for _, task in waiting),
                                           return_exceptions=True)
            for (index, _), outcome in zip(waiting, results):
                outcomes[index] = outcome
        self._raise_first_failure(outcomes)

    @staticmethod
    def _raise_first_failure(outcomes):
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome       # cancellation first
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome

    async def _dag_stage(self, stage, snapshot):
        reason = self._skip_reason(stage)
        if reason:
            self._record_skip(stage, reason)
            return
        record = self.execute_now(stage, snapshot)
        if record is None:
            record = await self.execute(stage, snapshot)
        if record.status == SUCCESS and isinstance(record.output, dict) \
                and "directive" in record.output:
            await self._follow_directive(stage, record, snapshot)
        self._store(record)

    def _skip_reason(self, stage):
        if stage.id in self.skip:
            return self.skip[stage.id]
        if not stage.enabled:
            return "disabled"
        deps = stage.depends_on
        if deps and all(self.skip.get(dep) in _BRANCH_REASONS for dep in deps):
            return "control_flow"   # every input was skipped: so is this (transitive)
        return None

    def _record_skip(self, stage, reason):
        self.skip.setdefault(stage.id, reason)
        record = StageRecord(stage.id, stage.type, SKIPPED,
                             output=skipped_marker("control_flow" if reason != "disabled"
                                                   else "disabled"))
        self.records.setdefault(stage.id, record)
        self.upstream.setdefault(stage.id, record.output)

    def _store(self, record):
        self.records[record.stage_id] = record
        self.upstream[record.stage_id] = record.output

    # -- one stage ----------------------------------------------------------------------

    async def execute(self, stage, upstream, loop_vars=None, record_id=None, on_error=True):
        """Run ``stage`` (with retries and timeout); return its record.

        A failure raises StageFailure unless ``on_error`` applies and the stage says
        ``continue``, in which case the record is ``failed`` with the fallback output.
        """
        record = self.execute_now(stage, upstream, loop_vars, record_id, on_error)
        if record is not None:
            return record
        record = StageRecord(record_id or stage.id, stage.type, SUCCESS,
                             started_at=self._now())
        try:
            plan = self.plan.stage_plan(stage)
            inputs = plan.inputs(self, upstream, loop_vars)
            await own_task()
            record.output = await self._attempts(plan, inputs, upstream, record)
        except (LoopSignal, FmEdgeError) as error:
            return self._stage_failed(stage, record, error, upstream, loop_vars, on_error)
        record.finished_at = self._now()
        return record

    def execute_now(self, stage, upstream, loop_vars=None, record_id=None, on_error=True):
        """``execute`` without a coroutine, for a stage that never waits (a quick pure
        component, no retries: a timer could not interrupt it anyway); None for any other
        stage, which ``execute`` runs."""
        plan = self.plan.stage_plans.get(stage.id)
        if plan is None or plan.stage is not stage:
            try:
                plan = self.plan.stage_plan(stage)
            except FmEdgeError:
                return None                 # execute() records the failure
        if not plan.inline:
            return None
        now = self._now
        # Positional: this runs for every stage and iteration, and keywords cost more.
        record = StageRecord(record_id or stage.id, stage.type, SUCCESS, None, None, None,
                             now(), None, 1)
        try:
            context = StageContext(stage, plan.inputs(self, upstream, loop_vars), self.state,
                                   upstream, self.services, record)
            try:
                record.output = plan.run(context)
            except (FmEdgeError, LoopSignal):
                raise
            except Exception as exc:  # noqa: BLE001 - named and re-raised as the stage's
                raise _unexpected(stage, exc)
        except (LoopSignal, FmEdgeError) as error:
            return self._stage_failed(stage, record, error, upstream, loop_vars, on_error)
        record.finished_at = now()
        return record

    def _stage_failed(self, stage, record, error, upstream, loop_vars, on_error):
        if isinstance(error, LoopSignal):
            if loop_vars is not None:
                raise error             # the loop body's break/continue: foreach handles it
            error = ComponentError(f"stage {stage.id}: {type(error).__name__} outside a "
                                   "foreach loop body; use it in a foreach's loop_stages")
        record.finished_at = self._now()
        return self._failed(stage, record, error, upstream, loop_vars, on_error)

    def _failed(self, stage, record, error, upstream, loop_vars, on_error):
        record.status = FAILED
        record.error = str(error)
        record.error_type = reference_error_name(error)
        self.records[record.stage_id] = record
        log.info("run %s: stage %s failed: %s", self.state.run_id, record.stage_id, error)
        if not (on_error and stage.on_error == "continue"):
            raise StageFailure(record.stage_id, error)
        record.output = self._fallback(stage, upstream, loop_vars)
        return record

    def _fallback(self, stage, upstream, loop_vars):
        if stage.fallback_output is None:
            return None
        try:
            return template.resolve(stage.fallback_output, self.scope(stage, upstream,
                                                                      loop_vars))
        except FmEdgeError as error:
            log.warning("stage %s: fallback_output could not be resolved (%s); using it "
                        "as written", stage.id, error)
            return stage.fallback_output

    async def _attempts(self, plan, inputs, upstream, record):
        stage = plan.stage
        policy = stage.retry
        retries = policy.max_retries if policy else 0
        for attempt in range(retries + 1):
            record.attempts = attempt + 1
            try:
                return await self._attempt(plan, inputs, upstream, record)
            except LoopSignal:
                raise
            except FmEdgeError as error:
                if not error.retryable or attempt == retries:
                    if retries and error.retryable:
                        raise RetryExhaustedError(
                            f"stage {stage.id} failed after {attempt + 1} attempts: "
                            f"{error}") from error
                    raise
                await self._backoff(stage, policy, attempt, error)

    async def _backoff(self, stage, policy, attempt, error):
        delay = policy.delay_ms(attempt) * self.rng.uniform(0.75, 1.25) / 1000.0
        log.info("run %s: stage %s attempt %d failed (%s); retrying in %.2fs",
                 self.state.run_id, stage.id, attempt + 1, error, delay)
        self.services.count_retry(stage.id)
        await asyncio.sleep(delay)

    async def _attempt(self, plan, inputs, upstream, record):
        stage = plan.stage
        context = StageContext(stage, dict(inputs), self.state, upstream, self.services,
                               record)
        try:
            if plan.quick:      # with retries: see execute_now
                return plan.run(context)
            return await asyncio.wait_for(_call(plan.spec, context), plan.timeout_s)
        except (FmEdgeError, LoopSignal):
            raise
        except Exception as exc:  # noqa: BLE001 - named and re-raised as the stage's
            raise _unexpected(stage, exc)

    # -- inputs -------------------------------------------------------------------------

    def scope(self, stage, upstream, loop_vars, extra=None):
        return _StageScope(self.state, stage.id, upstream, loop_vars, self.clock, extra)

    # -- control flow -------------------------------------------------------------------

    async def _follow_directive(self, stage, record, upstream):
        directive = record.output.get("directive")
        if isinstance(directive, dict):
            await _control_flow().follow(self, stage, record, directive, upstream)


def _control_flow():
    """The control-flow module, imported on first use (it imports this one)."""
    global _control
    if _control is None:
        from . import control as module

        _control = module
    return _control


_control = None


class _StageScope(template.TemplateScope):
    """The scope of one stage execution. Its context (ids, variables, loop variables) is
    made only if a template reads it; most stages only read input and upstream."""

    __slots__ = ("_state", "_stage_id", "_loop_vars")

    def __init__(self, state, stage_id, upstream, loop_vars, clock, extra=None):
        if extra:
            template.TemplateScope.__init__(self, clock=clock, extra=extra)
        else:   # what the base sets, without its checks: this runs for every stage
            self.clock = clock
            self.extra = _NO_EXTRA
            self._context = self._stages = self._names = None
        self.input = state.pipeline_input
        self.upstream = upstream
        self.env = state.env
        self._state, self._stage_id, self._loop_vars = state, stage_id, loop_vars

    def _make_context(self):
        return self._state.context(self._stage_id, self._loop_vars)


_NO_EXTRA = {}   # shared, never written

# A run that has not waited for this long lets the event loop run (see pause).
_MAX_BUSY_S = 0.005


async def _call(spec, context):
    if spec.is_async:
        return await spec.run(context)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, spec.run, context)


def _unexpected(stage, exc):
    """The stage's error for an exception that is not one: the attempt's time limit ran
    out, or (logged with its traceback) a bug or a library error in the component."""
    if isinstance(exc, asyncio.TimeoutError):
        error = StageTimeoutError(f"stage {stage.id} timed out after "
                                  f"{stage.effective_timeout_ms} ms (timeout_ms)")
        error.__suppress_context__ = True
        return error
    log.error("stage %s (%s) raised", stage.id, stage.type, exc_info=exc)
    error = ComponentError(f"stage {stage.id} ({stage.type}) failed: "
                           f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


# -- running a coroutine until it first waits ---------------------------------------------

def start(coroutine):
    """Run ``coroutine`` until it first has to wait. Returns (True, its result) if it
    finished without waiting, else (False, an awaitable that carries on from there).
    Its exceptions propagate. Until then it runs in the caller's task: work that may wait
    awaits ``own_task()`` first."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, _carry_on(coroutine, waiting_on)


async def in_loop():
    """Carry on in the runtime's event loop: nothing to do there. In another thread (an
    HTTP worker that started a run with ``drive``) it hands the whole coroutine over to
    the loop, where it resumes right here: whatever waits needs the loop."""
    if asyncio._get_running_loop() is None:
        await _HOP


class _Hop:
    """What ``in_loop`` yields to ``drive`` in a thread without a loop."""

    __slots__ = ()

    def __await__(self):
        yield self


_HOP = _Hop()


def drive(coroutine, loop, adopt):
    """Run ``coroutine`` in this thread, which has no event loop, until it finishes or
    needs ``loop`` (``in_loop``): then ``adopt(task)`` is called in the loop with the
    task carrying it on there. Returns (True, its result) or (False, None); raises what
    it raised before it got to the loop."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration as stop:
        return True, stop.value
    if waiting_on is not _HOP:    # it waited on something without asking for the loop
        coroutine.close()
        raise RuntimeError("a run started outside the event loop waited on "
                           f"{waiting_on!r} before moving to the loop (in_loop)")
    # None first: the task resumes it on its first step, in the loop's thread.
    continuation = _carry_on(coroutine, None)
    try:
        loop.call_soon_threadsafe(lambda: adopt(loop.create_task(continuation)))
    except RuntimeError:          # the loop is closed: nothing can carry it on
        continuation.close()
        coroutine.close()
        raise
    return False, None


async def own_task():
    """Carry on in the task that will finish this work: what ``start`` drives runs inside
    whichever task called it, and what captures the current task (asyncio.timeout, and
    wait_for on Python 3.12+) must capture the right one. Costs one loop iteration."""
    await asyncio.sleep(0)


async def _carry_on(coroutine, waiting_on):
    return await _Continuation(coroutine, waiting_on)


class _Continuation:
    """``yield from`` for a coroutine someone else started: hands what it waits on to the
    task awaiting this, and that task's answers (or cancellation) back to it."""

    __slots__ = ("coroutine", "waiting_on")

    def __init__(self, coroutine, waiting_on):
        self.coroutine = coroutine
        self.waiting_on = waiting_on

    def __await__(self):
        coroutine, waiting_on = self.coroutine, self.waiting_on
        while True:
            try:
                answer = yield waiting_on
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:  # noqa: BLE001 - thrown in by the task: pass on
                try:
                    waiting_on = coroutine.throw(error)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting_on = coroutine.send(answer)
                except StopIteration as stop:
                    return stop.value


# -- plans: what every run of a parsed pipeline shares --------------------------------------

class PipelinePlan:
    """A parsed pipeline's waves and its stages' plans, worked out once for all its runs."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.stages = {stage.id: stage for stage in pipeline.stages}
        self.waves = tuple(tuple(self.stages[stage_id] for stage_id in wave)
                           for wave in topological_waves(pipeline))
        self.stage_plans = {}      # stage id -> StagePlan, made on first use
        self._never_waits = None

    @property
    def never_waits(self):
        """True when every stage is a quick pure function without retries and none
        directs the run (control flow): a run of it waits for nothing, so any thread may
        run it (see ``in_loop``); it only pauses, in the loop, if it runs long."""
        if self._never_waits is None:
            try:
                self._never_waits = all(
                    self.stage_plan(stage).inline and family_of(stage.type) != "control"
                    for stage in self.stages.values())
            except FmEdgeError:      # an unknown component: the run fails, in the loop
                self._never_waits = False
        return self._never_waits

    def stage(self, stage_id):
        """The stage with this id; KeyError when there is none."""
        return self.stages[stage_id]

    def stage_plan(self, stage):
        plan = self.stage_plans.get(stage.id)
        if plan is None or plan.stage is not stage:
            plan = self.stage_plans[stage.id] = StagePlan(stage)
        return plan


_PIPELINE_PLANS = {}
_MAX_PIPELINE_PLANS = 256


def pipeline_plan(pipeline):
    """The plan of ``pipeline``, cached while the pipeline object lives in the cache (so
    its id cannot be reused by another)."""
    plan = _PIPELINE_PLANS.get(id(pipeline))
    if plan is None or plan.pipeline is not pipeline:
        if len(_PIPELINE_PLANS) >= _MAX_PIPELINE_PLANS:
            _PIPELINE_PLANS.clear()
        plan = _PIPELINE_PLANS[id(pipeline)] = PipelinePlan(pipeline)
    return plan


class StagePlan:
    """How a stage's inputs are made, worked out once (semantics §2.6-2.7): templates
    compiled, declared defaults and required fields looked up, and the inputs that hold
    no template coerced to their declared type in advance. Each run gets fresh
    containers, in the key order the component has always seen: missing fields' defaults,
    then the stage's inputs as written, then default lists/dicts."""

    def __init__(self, stage):
        spec = get_component(stage.type)
        if spec is None:
            raise ComponentError(f"stage {stage.id}: component type {stage.type!r} is not "
                                 "implemented on fm-edge")
        self.stage = stage
        self.spec = spec
        self.run = spec.run
        self.quick = not (spec.blocking or spec.is_async)   # a pure, quick function
        self.inline = self.quick and not stage.retry         # ... that needs no retry loop
        self.timeout_s = stage.effective_timeout_ms / 1000.0
        fields = spec.fields
        given = stage.inputs
        late = spec.late_inputs or {}
        # Late inputs read the other inputs as resolved, before coercion: none coerced early.
        self.late = tuple((name, names_from, template.compile_value(given[name]))
                          for name, names_from in late.items() if name in given)
        missing = [(name, field) for name, field in fields.items() if name not in given]
        self.required = next((name for name, field in missing if field.required), None)
        self.base = {name: field.default_value() for name, field in missing
                     if not (field.required or callable(field.default))}
        self.factories = tuple((name, field) for name, field in missing
                               if callable(field.default) and not field.required)
        self.templated = bool(self.late)
        self.resolvers = []       # (name, function(scope)), in the stage's input order
        self.copies = []          # (name, function()): fresh containers for each run
        coerced_late = set()
        for name, value in given.items():
            if name not in late:
                coerced_late.update(self._plan_input(name, value, fields.get(name)))
        coerced_late.update(name for name, _, _ in self.late if name in fields)
        self.coercions = tuple((name, field.type, field.type in ("any", "any?"))
                               for name, field in fields.items() if name in coerced_late)
        for name, _, _ in self.late:
            self.base[name] = None
        for name, _ in self.factories:
            self.base[name] = None

    def _plan_input(self, name, value, field):
        """Plans one input; returns its name if it must be coerced on each run."""
        try:
            templated = template.has_templates(value)
        except RecursionError:
            templated = True     # absurdly deep: resolving reports it, on every run
        if templated or self.late:
            self.templated = self.templated or templated
            self.base[name] = None
            self.resolvers.append((name, template.compile_value(value)))
            return (name,) if field else ()
        coerce_each_run = False
        if field is not None:
            try:
                value = coerce_input(self.stage, name, field.type, value)
            except MappingError:     # fails on every run, at the point it always did
                coerce_each_run = True
        if isinstance(value, (dict, list, tuple)):
            self.base[name] = None
            self.copies.append((name, template.fresh_copier(value)))
        else:
            self.base[name] = value
        return (name,) if coerce_each_run else ()

    def inputs(self, run, upstream, loop_vars):
        """The resolved, defaulted and coerced inputs of one execution."""
        stage = self.stage
        inputs = self.base.copy()
        for name, copy in self.copies:
            inputs[name] = copy()
        if self.templated:
            scope = _StageScope(run.state, stage.id, upstream, loop_vars, run.clock)
            try:
                for name, resolve in self.resolvers:
                    inputs[name] = resolve(scope)
                if self.late:
                    early = {name: inputs[name] for name, _ in self.resolvers}
                    for name, names_from, resolve in self.late:
                        late_scope = run.scope(stage, upstream, loop_vars, names_from(early))
                        inputs[name] = early[name] = resolve(late_scope)
            except ExpressionError as error:   # TemplateError included
                raise MappingError(f"stage {stage.id}: {error}") from error
            except RecursionError:
                error = TemplateError("Parameters are nested too deeply to resolve; "
                                      "flatten them")
                raise MappingError(f"stage {stage.id}: {error}") from error
        if self.required:
            raise MappingError(f"stage {stage.id}: input '{self.required}' is required; add "
                               "it to the stage's config or input_mapping")
        for name, field in self.factories:
            inputs[name] = field.default_value()   # a fresh list/dict for every call
        for name, type_name, loose in self.coercions:
            value = inputs[name]
            if loose and value is not None:    # any, any?: only text changes (stripped)
                if isinstance(value, str):
                    inputs[name] = value.strip()
            else:
                inputs[name] = coerce_input(stage, name, type_name, value)
        return inputs


def coerce_input(stage, name, type_name, value):
    """A declared input's value as its component expects it (semantics §2.6)."""
    if value is None and type_name.endswith("?"):
        return value
    if type_name == "any?" or (type_name == "any" and value is not None):
        return value.strip() if isinstance(value, str) else value
    try:
        value = template.coerce(value, type_name, field=name)
    except ExecutionError as error:
        raise MappingError(f"stage {stage.id}: {error}") from error
    return value.strip() if isinstance(value, str) else value


__all__ = ["PipelineRun", "RunState", "StageFailure", "RetryExhaustedError", "BreakLoop",
           "PipelinePlan", "StagePlan", "pipeline_plan", "coerce_input", "start", "own_task",
           "reference_error_name", "error_names"]
