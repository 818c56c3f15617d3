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
"""

import asyncio
import logging
import random

from ..errors import ExecutionError, ExpressionError, FmEdgeError, StageTimeoutError
from ..errors import TemplateError
from . import template
from .components import get_component
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
        self.services = services
        self.rng = rng or random.Random()
        self.clock = clock
        self.records = {}
        self.upstream = {}
        self.skip = {}              # stage id -> reason
        self.early_return = None    # the triggered return stage's output
        self.returned_by = None
        self.failure = None

    # -- the wave loop ------------------------------------------------------------------

    async def run(self):
        for wave in topological_waves(self.pipeline):
            if self.early_return is not None:
                break
            snapshot = dict(self.upstream)
            stages = [self.pipeline.stage(stage_id) for stage_id in wave]
            if len(stages) == 1:        # nothing to run beside it: no task needed
                await self._dag_stage(stages[0], snapshot)
                continue
            outcomes = await asyncio.gather(
                *(self._dag_stage(stage, snapshot) for stage in stages),
                return_exceptions=True)
            self._raise_first_failure(stages, outcomes)

    def _raise_first_failure(self, stages, outcomes):
        for stage, outcome in zip(stages, outcomes):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
        for stage, outcome in zip(stages, outcomes):
            if isinstance(outcome, Exception):
                raise outcome

    async def _dag_stage(self, stage, snapshot):
        reason = self._skip_reason(stage)
        if reason:
            self._record_skip(stage, reason)
            return
        record = await self.execute(stage, snapshot)
        if record.status == SUCCESS:
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
        record = StageRecord(record_id or stage.id, stage.type, SUCCESS,
                             started_at=self.services.now())
        try:
            record.output = await self._attempts(stage, upstream, loop_vars, record)
        except LoopSignal as signal:
            if loop_vars is not None:
                raise
            error = ComponentError(f"stage {stage.id}: {type(signal).__name__} outside a "
                                   "foreach loop body; use it in a foreach's loop_stages")
            record.finished_at = self.services.now()
            return self._failed(stage, record, error, upstream, loop_vars, on_error)
        except FmEdgeError as error:
            record.finished_at = self.services.now()
            return self._failed(stage, record, error, upstream, loop_vars, on_error)
        record.finished_at = self.services.now()
        return record

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
            return template.resolve(stage.fallback_output, self._scope(stage, upstream,
                                                                       loop_vars))
        except FmEdgeError as error:
            log.warning("stage %s: fallback_output could not be resolved (%s); using it "
                        "as written", stage.id, error)
            return stage.fallback_output

    async def _attempts(self, stage, upstream, loop_vars, record):
        spec = self._spec(stage)
        inputs = self._inputs(stage, spec, upstream, loop_vars)
        policy = stage.retry
        retries = policy.max_retries if policy else 0
        for attempt in range(retries + 1):
            record.attempts = attempt + 1
            try:
                return await self._attempt(stage, spec, inputs, upstream, record)
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

    async def _attempt(self, stage, spec, inputs, upstream, record):
        context = StageContext(stage, dict(inputs), self.state, upstream, self.services,
                               usage=record.usage)
        timeout_s = stage.effective_timeout_ms / 1000.0
        try:
            if not (spec.blocking or spec.is_async):
                # A quick pure operator runs inline: a timer cannot interrupt it anyway,
                # and a task per call would cost more than most of these components.
                return spec.run(context)
            return await asyncio.wait_for(self._call(spec, context), timeout_s)
        except asyncio.TimeoutError:
            raise StageTimeoutError(f"stage {stage.id} timed out after "
                                    f"{stage.effective_timeout_ms} ms (timeout_ms)") from None
        except (FmEdgeError, LoopSignal, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug or an unexpected library error in a component
            log.exception("stage %s (%s) raised", stage.id, stage.type)
            raise ComponentError(f"stage {stage.id} ({stage.type}) failed: "
                                 f"{type(exc).__name__}: {exc}") from exc

    async def _call(self, spec, context):
        if spec.is_async:
            output = await spec.run(context)
        elif spec.blocking:
            loop = asyncio.get_running_loop()
            output = await loop.run_in_executor(None, spec.run, context)
        else:
            output = spec.run(context)
        return output

    def _spec(self, stage):
        spec = get_component(stage.type)
        if spec is None:
            raise ComponentError(f"stage {stage.id}: component type {stage.type!r} is not "
                                 "implemented on fm-edge")
        return spec

    # -- inputs -------------------------------------------------------------------------

    def _scope(self, stage, upstream, loop_vars, extra=None):
        return template.TemplateScope(
            input=self.state.pipeline_input, upstream=upstream, env=self.state.env,
            context=self.state.context(stage.id, loop_vars), clock=self.clock, extra=extra)

    def _inputs(self, stage, spec, upstream, loop_vars):
        late = spec.late_inputs or {}
        early = {k: v for k, v in stage.inputs.items() if k not in late}
        try:
            resolved = template.resolve(early, self._scope(stage, upstream, loop_vars))
            for name, names_from in late.items():
                if name in stage.inputs:
                    scope = self._scope(stage, upstream, loop_vars, names_from(resolved))
                    resolved[name] = template.resolve(stage.inputs[name], scope)
        except ExpressionError as error:   # TemplateError included
            raise MappingError(f"stage {stage.id}: {error}") from error
        return apply_fields(stage, spec.fields, resolved)

    # -- control flow -------------------------------------------------------------------

    async def _follow_directive(self, stage, record, upstream):
        directive = record.output.get("directive") if isinstance(record.output, dict) else None
        if not isinstance(directive, dict):
            return
        from . import control

        await control.follow(self, stage, record, directive, upstream)


def apply_fields(stage, fields, resolved):
    """Defaults, required fields and coercion of declared inputs (semantics §2.6-2.7)."""
    required, constants, factories, present = _field_plan(fields, resolved)
    if required:
        raise MappingError(f"stage {stage.id}: input '{required[0]}' is required; add it "
                           "to the stage's config or input_mapping")
    inputs = dict(constants)
    inputs.update(resolved)
    for name, spec in factories:
        inputs[name] = spec.default_value()   # a fresh list/dict for every call
    for name, type_name in present:
        value = inputs[name]
        if value is None and type_name.endswith("?"):
            continue
        if type_name == "any?" or (type_name == "any" and value is not None):
            if isinstance(value, str):
                inputs[name] = value.strip()
        else:
            inputs[name] = _coerced(stage, name, type_name, value)
    return inputs


_PLANS = {}
_MAX_PLANS = 4096


def _field_plan(fields, resolved):
    """(required missing, constant defaults, default factories, [(present name, type)])
    for this set of input keys, cached (the plan keeps ``fields`` alive, so its id stays):
    a stage's keys are the same on every run, and walking every declared field of every
    stage each time cost more than most components."""
    key = (id(fields), frozenset(resolved))
    plan = _PLANS.get(key)
    if plan is None:
        missing = [(name, spec) for name, spec in fields.items() if name not in resolved]
        required = tuple(name for name, spec in missing if spec.required)
        constants = {name: spec.default_value() for name, spec in missing
                     if not callable(spec.default) and not spec.required}
        factories = tuple((name, spec) for name, spec in missing
                          if callable(spec.default) and not spec.required)
        present = tuple((name, spec.type) for name, spec in fields.items()
                        if name in resolved)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = (required, constants, factories, present, fields)
    return plan[:4]


def _coerced(stage, name, type_name, value):
    try:
        value = template.coerce(value, type_name, field=name)
    except ExecutionError as error:
        raise MappingError(f"stage {stage.id}: {error}") from error
    return value.strip() if isinstance(value, str) else value


__all__ = ["PipelineRun", "RunState", "StageFailure", "RetryExhaustedError", "BreakLoop",
           "apply_fields", "reference_error_name", "error_names"]
