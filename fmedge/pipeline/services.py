"""Services: what a StageContext reaches through (LLM, expressions, usage, logs, HTTP)."""

import logging
import time

from .expr import compile_expression

log = logging.getLogger("fmedge.stage")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class Services:
    """One per run; the executor's capabilities, narrowed to what components may use."""

    def __init__(self, executor, state, result):
        self.executor = executor
        self.state = state
        self.result = result
        self.logs = []

    def now(self):
        return self.executor.clock()

    def evaluate(self, expression, names):
        return compile_expression(expression).evaluate(names)

    def llm_adapter(self, stage, model=None):
        return self.executor.adapter_for(stage, model)

    def add_usage(self, stage_id, prompt_tokens, completion_tokens, model):
        """Usage reported outside a stage record (tests' harnesses) goes to the run."""
        self.result.usage.add(prompt_tokens, completion_tokens, model)

    def log(self, stage_id, level, message, data):
        entry = {"time": time.time(), "stage_id": stage_id, "level": level,
                 "message": message, "data": data}
        self.logs.append(entry)
        log.log(_LEVELS.get(level, logging.INFO), "run %s stage %s: %s", self.state.run_id,
                stage_id, message)

    def cancelled(self):
        return self.state.run_id in self.executor._cancelled

    def count_retry(self, stage_id):
        self.executor.count("retries")

    def http_pool(self):
        from ..http import shared_pool

        return shared_pool()

    def run_child(self, pipeline_id, inputs, depth, version=None):
        return self.executor.run_child(pipeline_id, inputs, depth, version)
