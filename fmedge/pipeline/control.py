"""What a run does with a control-flow directive (semantics §4.4, with design §5's fixes).

* conditional / router: the branches not taken join the skip set;
* foreach: body stages run inline once per item, each iteration with its own scope
  (``{{context.<item_variable>}}`` is per iteration, also in parallel), recorded as
  ``<stage>_iter_<n>``; ``break_loop`` ends the loop, ``continue_loop`` the iteration;
* trycatch: try stages inline; on error, catch stages when the error type matches
  (fm-edge names or the reference's class names), finally always; ``continue`` swallows
  only matched errors (the reference swallowed any: a bug);
* return: ends the run; its ``return_value`` becomes the output;
* subpipeline: runs another cached pipeline under ``timeout_ms``, depth-limited.
"""

import asyncio
import time

from ..errors import ExecutionError, FmEdgeError, StageTimeoutError
from .components.base import BreakLoop, ContinueLoop
from .run import StageFailure, error_names, own_task, reference_error_name

MAX_SUBPIPELINE_DEPTH = 5


async def follow(run, stage, record, directive, upstream):
    kind = directive.get("directive_type")
    handler = _HANDLERS.get(kind)
    if handler is not None:
        await handler(run, stage, record, directive, upstream)


async def _branch(run, stage, record, directive, upstream):
    execute = set(directive.get("execute_stages") or [])
    for stage_id in directive.get("skip_stages") or []:
        if stage_id not in execute:
            run.skip.setdefault(stage_id, "control_flow")


# -- foreach ----------------------------------------------------------------------------

async def _foreach(run, stage, record, directive, upstream):
    items = directive.get("loop_items") or []
    body = [run.plan.stage(s) for s in directive.get("loop_stages") or []]
    for body_stage in body:
        run.skip.setdefault(body_stage.id, "loop_body")   # their DAG slots are not rerun
    if not items or not body:
        record.output.update(is_complete=True)
        return
    loop = _Loop(run, stage, record, directive, upstream, body, items)
    results = await (loop.parallel() if directive.get("parallel") else loop.sequential())
    record.output.update(results=results if directive.get("collect_results", True) else [],
                         processed_items=len(items), is_complete=True)


class _Loop:
    def __init__(self, run, stage, record, directive, upstream, body, items):
        self.run, self.stage, self.record = run, stage, record
        self.directive, self.upstream, self.body, self.items = directive, upstream, body, items
        self.collected = []
        self.item_variable = directive.get("item_variable") or "item"
        self.index_variable = directive.get("index_variable") or "index"

    async def sequential(self):
        outputs = []
        for index, item in enumerate(self.items):
            if self.run.busy():     # a long loop of quick stages never waits
                await self.run.pause()
            try:
                output = await self.iteration(index, item)
            except BreakLoop as signal:
                if signal.result is not None:
                    outputs.append(signal.result)
                break
            if output is not _DROPPED:
                outputs.append(output)
                self.collected.append(output)
        return outputs

    async def parallel(self):
        limit = asyncio.Semaphore(max(1, int(self.directive.get("max_parallel") or 5)))
        stop = asyncio.Event()

        async def bounded(index, item):
            async with limit:
                if stop.is_set():
                    return _DROPPED
                try:
                    return await self.iteration(index, item)
                except BreakLoop as signal:
                    stop.set()
                    return signal.result if signal.result is not None else _DROPPED

        outcomes = await asyncio.gather(*(bounded(i, item) for i, item in
                                          enumerate(self.items)))
        return [o for o in outcomes if o is not _DROPPED]

    def loop_vars(self, index, item):
        names = {self.item_variable: item, self.index_variable: index,
                 "loop_item": item, "loop_index": index, "loop_total": len(self.items),
                 "loop_remaining": len(self.items) - index - 1,
                 "loop_results": list(self.collected)}
        return names

    async def iteration(self, index, item):
        """Run the body once; returns the last body stage's output, or _DROPPED."""
        loop_vars = self.loop_vars(index, item)
        scope = dict(self.upstream)
        own = {self.item_variable: loop_vars[self.item_variable],
               self.index_variable: loop_vars[self.index_variable]}
        scope[self.stage.id] = dict(self.record.output, current_item=item,
                                    current_index=index, **own)
        last = None
        try:
            for body_stage in self.body:
                record_id = f"{body_stage.id}_iter_{index}"
                result = self.run.execute_now(body_stage, scope, loop_vars, record_id, False)
                if result is None:
                    result = await self.run.execute(body_stage, scope, loop_vars, record_id,
                                                    on_error=False)
                self.run.records[record_id] = result
                scope[body_stage.id] = result.output
                last = result.output
        except ContinueLoop:
            return _DROPPED
        except StageFailure as failure:
            if self.directive.get("break_on_error", True):
                raise
            self.run.services.log(self.stage.id, "warning",
                                  f"iteration {index} failed and was dropped: "
                                  f"{failure.error}", {})
            return _DROPPED
        return last


_DROPPED = object()


# -- trycatch -----------------------------------------------------------------------------

async def _trycatch(run, stage, record, directive, upstream):
    groups = [directive.get(k) or [] for k in ("try_stages", "catch_stages",
                                                 "finally_stages")]
    for stage_id in (s for group in groups for s in group):
        run.skip.setdefault(stage_id, "inline")
    scope = dict(upstream)
    error = await _run_inline(run, groups[0], scope)
    caught = error is not None and _matches(error, directive.get("catch_error_types"))
    if error is not None:
        info = {"error": str(error), "error_type": reference_error_name(error),
                "error_occurred": True}
        scope[stage.id] = dict(record.output, **info)
        if caught and groups[1]:
            await _run_inline(run, groups[1], scope, raise_errors=True)
    await _run_inline(run, groups[2], scope, raise_errors=True)
    recovered = error is not None and caught and directive.get("error_scope") == "continue"
    record.output.update(status="caught" if error is not None else "success",
                         error_occurred=error is not None,
                         error_message=str(error) if error is not None else None,
                         error_type=reference_error_name(error) if error else None,
                         recovered=recovered)
    if error is not None and not recovered:
        raise StageFailure(stage.id, error)


def _matches(error, wanted):
    return not wanted or bool(error_names(error) & set(wanted))


async def _run_inline(run, stage_ids, scope, raise_errors=False):
    """Run stages in listed order on ``scope``; return the first error (or raise it)."""
    for stage_id in stage_ids:
        stage = run.plan.stage(stage_id)
        try:
            result = await run.execute(stage, scope, on_error=False)
        except StageFailure as failure:
            if raise_errors:
                raise
            return failure.error
        run.records[stage_id] = result
        run.upstream[stage_id] = result.output
        scope[stage_id] = result.output
    return None


# -- return and subpipeline -----------------------------------------------------------------

async def _return(run, stage, record, directive, upstream):
    if directive.get("should_return"):
        run.early_return, run.returned_by = record.output, stage.id


async def _subpipeline(run, stage, record, directive, upstream):
    started = time.monotonic()
    output = record.output
    try:
        result = await _run_child(run, stage, directive)
    except FmEdgeError as error:
        output.update(status="failed", error=str(error),
                      execution_time_ms=round((time.monotonic() - started) * 1000, 3))
        policy = directive.get("on_error")
        if policy == "propagate":
            raise StageFailure(stage.id, error)
        output["result"] = directive.get("default_result") if policy == "default" else None
        return
    output.update(run_id=result.run_id, status=result.status, result=result.output,
                  error=result.error,
                  execution_time_ms=round((time.monotonic() - started) * 1000, 3))
    if result.status != "completed" and directive.get("on_error") == "propagate":
        raise StageFailure(stage.id, ExecutionError(
            f"subpipeline {directive['pipeline_id']} ended {result.status}: {result.error}"))


async def _run_child(run, stage, directive):
    depth = run.state.depth + 1
    if depth > MAX_SUBPIPELINE_DEPTH:
        raise ExecutionError(f"stage {stage.id}: subpipelines nested deeper than "
                             f"{MAX_SUBPIPELINE_DEPTH} levels (a pipeline calling itself?)")
    timeout = (directive.get("timeout_ms") or 60000) / 1000.0
    await own_task()      # the time limit below must stop this stage's task, no other
    child = run.services.run_child(directive["pipeline_id"], directive.get("input_data") or {},
                                   depth, directive.get("pipeline_version"))
    try:
        return await asyncio.wait_for(child, timeout)
    except asyncio.TimeoutError:
        raise StageTimeoutError(f"stage {stage.id}: subpipeline {directive['pipeline_id']} "
                                f"took longer than {timeout * 1000:.0f} ms") from None


_HANDLERS = {"conditional": _branch, "router": _branch, "foreach": _foreach,
             "trycatch": _trycatch, "return": _return, "subpipeline": _subpipeline}

__all__ = ["follow"]
