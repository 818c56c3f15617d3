"""What a component sees and how it declares itself.

A component is a function ``run(ctx) -> dict`` (or ``async def``) registered with
:func:`component`. The executor resolves the stage's templates, applies the declared
input fields (defaults, required, coercion per semantics §2.6) and calls it with a
:class:`StageContext`. Plain functions run inline (they must be quick and pure);
``blocking=True`` ones run in a worker thread (file and network I/O).

Errors: raise :class:`ComponentError` (``retryable=True`` for transient failures such as
a connection refused); the executor names the stage and applies retries/on_error.
"""

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ...errors import ExecutionError, ExpressionError

MISSING = object()


@dataclass(frozen=True)
class Field:
    """One declared input: its type (for coercion), default, and whether it is required.

    ``type`` is one of: any, str, int, float, bool, list, dict, number.
    A trailing ``?`` (``"str?"``) makes None acceptable.
    """

    type: str = "any"
    default: Any = MISSING
    required: bool = False

    def default_value(self):
        if callable(self.default):
            return self.default()  # list/dict defaults are factories: never shared
        return None if self.default is MISSING else self.default


@dataclass(frozen=True)
class ComponentSpec:
    type: str
    run: Callable
    fields: Dict[str, Field]
    blocking: bool = False
    # When False, the executor passes inputs unresolved (control flow resolves per item).
    resolve_inputs: bool = True
    # Inputs resolved after the others, with extra template names computed from them:
    # {field: function(resolved_inputs) -> {name: value}} (json_transform's `template`
    # reads its own `data` as {{data...}}).
    late_inputs: Optional[Dict[str, Callable]] = None

    @property
    def is_async(self):
        return _is_coroutine_function(self.run)


@functools.lru_cache(maxsize=None)
def _is_coroutine_function(function):
    import asyncio

    return asyncio.iscoroutinefunction(function)


class ComponentError(ExecutionError):
    """A component could not do its work; names the stage through the executor."""

    code = "component_error"
    reference_name = "ComponentExecutionError"


class MappingError(ComponentError):
    """Inputs could not be mapped/coerced to what the component declares."""

    code = "mapping_error"
    reference_name = "MappingExecutionError"


class LoopSignal(Exception):
    """Raised by break_loop/continue_loop; foreach catches it (not an error there)."""

    def __init__(self, message=None, result=None):
        super().__init__(message or type(self).__name__)
        self.message = message
        self.result = result


class BreakLoop(LoopSignal):
    pass


class ContinueLoop(LoopSignal):
    pass


class StageContext:
    """The one object a component receives.

    Attributes:
      stage       the parsed Stage (id, type, inputs as written, llm settings...)
      inputs      resolved and coerced inputs (dict)
      run         the RunState: run_id, pipeline_id, pipeline_version, device_id,
                  pipeline_input, variables (dict set by variable_set), config
      upstream    {stage_id: output} this stage may see
    """

    __slots__ = ("stage", "inputs", "run", "upstream", "_services", "_record")

    def __init__(self, stage, inputs, run, upstream, services, record=None):
        self.stage = stage
        self.inputs = inputs
        self.run = run
        self.upstream = upstream
        self._services = services
        self._record = record      # this stage's StageRecord, when the run keeps one

    @property
    def stage_id(self):
        return self.stage.id

    def evaluate(self, expression, names):
        """Evaluate a safe expression (semantics §2.8) with ``names`` in scope."""
        return self._services.evaluate(expression, names)

    def compiled(self, expression):
        """``evaluate`` of one expression as a function of ``names``, compiled once (for a
        condition tested on many items); None if it does not compile (``evaluate`` says
        why, each time it is called)."""
        from ..expr import compile_expression

        try:
            return compile_expression(expression).evaluate
        except ExpressionError:
            return None

    def llm(self, model: Optional[str] = None):
        """The LocalLLMAdapter for this stage (stage ``model`` overrides the default)."""
        return self._services.llm_adapter(self.stage, model)

    def add_usage(self, prompt_tokens=0, completion_tokens=0, model=None):
        if self._record is not None:
            self._record.usage.add(prompt_tokens, completion_tokens, model)
        else:
            self._services.add_usage(self.stage.id, prompt_tokens, completion_tokens, model)

    def log(self, level, message, **data):
        self._services.log(self.stage.id, level, message, data)

    @property
    def cancelled(self):
        return self._services.cancelled()

    def http(self):
        """A shared urllib3.PoolManager (TLS verified) for components that call out."""
        return self._services.http_pool()
