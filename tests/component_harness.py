"""Call one component without the executor: real services, a small run state, no mocks.

    from tests.component_harness import call_component
    out = call_component("filter", {"data": {"n": 3}, "condition": "data['n'] > 2"})

``call_component`` applies the component's declared fields the way the executor does
before coercion: absent fields get their defaults, a missing required field raises
MappingError. It does not resolve templates and does not coerce types. Blocking components
run in a worker thread and async ones in an event loop, as in a run.

``make_context`` builds the StageContext alone, for tests that also look at the logs or the
run variables (``ctx._services.logs``, ``ctx.run.variables``).
"""

import asyncio
import atexit
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import urllib3

from fmedge.config import EdgeConfig
from fmedge.pipeline import expr
from fmedge.pipeline.components import get_component
from fmedge.pipeline.components.base import ComponentError, MappingError, StageContext
from fmedge.pipeline.document import Stage

STAGE_ID = "stage-under-test"

_lock = threading.Lock()
_shared = {}


def _shared_pool():
    with _lock:
        if "pool" not in _shared:
            _shared["pool"] = urllib3.PoolManager(num_pools=4, maxsize=4)
        return _shared["pool"]


def _default_config():
    """One EdgeConfig with a temporary data_dir for the whole test process."""
    with _lock:
        if "config" not in _shared:
            folder = tempfile.mkdtemp(prefix="fm-edge-components-")
            atexit.register(shutil.rmtree, folder, True)
            _shared["config"] = EdgeConfig(data_dir=folder)
        return _shared["config"]


class HarnessServices:
    """What the executor gives a StageContext, implemented for real and recorded."""

    def __init__(self, pool=None):
        self.logs = []          # (stage_id, level, message, data)
        self.usage = []         # (stage_id, prompt_tokens, completion_tokens, model)
        self.cancel = False
        self._pool = pool

    def evaluate(self, expression, names):
        return expr.evaluate(expression, names)

    def log(self, stage_id, level, message, data):
        self.logs.append((stage_id, level, message, dict(data)))

    def add_usage(self, stage_id, prompt_tokens, completion_tokens, model):
        self.usage.append((stage_id, prompt_tokens, completion_tokens, model))

    def cancelled(self):
        return self.cancel

    def http_pool(self):
        return self._pool or _shared_pool()

    def llm_adapter(self, stage, model):
        raise ComponentError("the component harness has no LLM (stage {})".format(stage.id))


class HarnessRun:
    """The RunState fields components read."""

    def __init__(self, variables=None, config=None, pipeline_input=None):
        self.run_id = "0123456789abcdef0123456789abcdef"
        self.pipeline_id = "harness-pipeline"
        self.pipeline_version = "1.0.0"
        self.device_id = "harness-device"
        self.variables = {} if variables is None else variables
        self.pipeline_input = {} if pipeline_input is None else pipeline_input
        self.config = config or _default_config()


def apply_declared_fields(type_name, fields, inputs):
    """Defaults for absent fields; MappingError for a missing required one. No coercion."""
    result = dict(inputs)
    for name, spec in fields.items():
        if name in result:
            continue
        if spec.required:
            raise MappingError("stage {}: input '{}' is required; add it to the stage's "
                               "config or input_mapping".format(STAGE_ID, name))
        result[name] = spec.default_value()
    return result


def make_context(type_name, inputs, *, variables=None, config=None, upstream=None,
                 timeout_ms=None):
    spec = get_component(type_name)
    if spec is None:
        raise LookupError("no component registered for {!r}".format(type_name))
    stage = Stage(id=STAGE_ID, type=type_name, declared_type=type_name,
                  inputs=dict(inputs), timeout_ms=timeout_ms)
    resolved = apply_declared_fields(type_name, spec.fields, inputs)
    return StageContext(stage, resolved, HarnessRun(variables, config), dict(upstream or {}),
                        HarnessServices())


def run_context(ctx):
    """Run the component of ``ctx.stage.type`` the way the executor calls it."""
    spec = get_component(ctx.stage.type)
    if asyncio.iscoroutinefunction(spec.run):
        return asyncio.run(spec.run(ctx))
    if spec.blocking:
        with ThreadPoolExecutor(max_workers=1) as worker:
            return worker.submit(spec.run, ctx).result()
    return spec.run(ctx)


def call_component(type_name, inputs, *, variables=None, config=None, upstream=None):
    """The output of component ``type_name`` for ``inputs`` (see the module docstring)."""
    ctx = make_context(type_name, inputs, variables=variables, config=config,
                       upstream=upstream)
    return run_context(ctx)
