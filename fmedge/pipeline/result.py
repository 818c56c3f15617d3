"""The shapes a run produces: one record per stage and the run's ExecutionResult."""

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

# Stage statuses keep the reference's names (success/failed/skipped).
SUCCESS, FAILED, SKIPPED = "success", "failed", "skipped"
# Run statuses (design §6).
COMPLETED, RUN_FAILED, CANCELLED, TIMEOUT = "completed", "failed", "cancelled", "timeout"


def iso(timestamp):
    """UTC ISO-8601 with milliseconds and a Z, as the Studio's run records use."""
    global _last_second
    if timestamp is None:
        return None
    second, seconds = _last_second
    if timestamp // 1 != second:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
        _last_second = (timestamp // 1, seconds)
    return f"{seconds}.{int((timestamp % 1) * 1000):03d}Z"


# The last whole second formatted: a run stamps all its records within a second or two.
_last_second = (None, None)


def skipped_marker(reason="control_flow"):
    """What `{{upstream.<id>}}` shows for a skipped stage (reference §3.6)."""
    return {"skipped": True, "reason": reason}


class Usage:
    """Tokens used (a plain class with slots: one is made for every stage record)."""

    __slots__ = ("prompt_tokens", "completion_tokens", "models")

    def __init__(self, prompt_tokens=0, completion_tokens=0, models=None):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.models = {} if models is None else models

    def __repr__(self):
        return "Usage(prompt_tokens=%r, completion_tokens=%r, models=%r)" % (
            self.prompt_tokens, self.completion_tokens, self.models)

    def __eq__(self, other):
        if type(other) is not Usage:
            return NotImplemented
        return (self.prompt_tokens, self.completion_tokens, self.models) == (
            other.prompt_tokens, other.completion_tokens, other.models)

    __hash__ = None

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens=0, completion_tokens=0, model=None):
        self.prompt_tokens += int(prompt_tokens or 0)
        self.completion_tokens += int(completion_tokens or 0)
        if model:
            self.models[model] = self.models.get(model, 0) + int(prompt_tokens or 0) + int(
                completion_tokens or 0)

    def merge(self, other):
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        for model, tokens in other.models.items():
            self.models[model] = self.models.get(model, 0) + tokens

    def to_dict(self):
        return {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "models": dict(self.models)}


class StageRecord:
    """What happened to one stage (or one foreach iteration of a body stage). A plain
    class with slots, its Usage made when first asked for: a run makes one record for
    every stage and every loop iteration, and most use no tokens."""

    __slots__ = ("stage_id", "component_type", "status", "output", "error", "error_type",
                 "started_at", "finished_at", "attempts", "usage_so_far")
    _FIELDS = __slots__[:-1] + ("usage",)

    def __init__(self, stage_id, component_type, status, output=None, error=None,
                 error_type=None, started_at=None, finished_at=None, attempts=0, usage=None):
        self.stage_id = stage_id
        self.component_type = component_type
        self.status = status
        self.output = output
        self.error = error
        self.error_type = error_type
        self.started_at = started_at
        self.finished_at = finished_at
        self.attempts = attempts
        self.usage_so_far = usage   # None until something asks for the usage

    @property
    def usage(self):
        if self.usage_so_far is None:
            self.usage_so_far = Usage()
        return self.usage_so_far

    def __repr__(self):
        return "StageRecord(%s)" % ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self._FIELDS)

    def __eq__(self, other):
        if type(other) is not StageRecord:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._FIELDS)

    __hash__ = None

    @property
    def duration_ms(self):
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return round((self.finished_at - self.started_at) * 1000.0, 3)

    def to_dict(self):
        return {"stage_id": self.stage_id, "component_type": self.component_type,
                "status": self.status, "output": self.output, "error": self.error,
                "error_type": self.error_type, "started_at": iso(self.started_at),
                "completed_at": iso(self.finished_at), "duration_ms": self.duration_ms,
                "attempts": self.attempts,
                "usage": (self.usage_so_far or _NO_USAGE).to_dict()}


_NO_USAGE = Usage()   # read only: what a record that counted nothing reports


@dataclass
class ExecutionResult:
    """The seed's result (status, output, duration_ms) plus everything a run record needs."""

    run_id: str
    pipeline_id: str
    pipeline_version: Optional[str] = None
    status: str = "running"
    output: Any = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    failed_stage: Optional[str] = None
    output_stage_id: Optional[str] = None
    inputs: Any = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    stages: Dict[str, StageRecord] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    device_id: Optional[str] = None

    @property
    def duration_ms(self):
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return round((self.finished_at - self.started_at) * 1000.0, 3)

    @property
    def ok(self):
        return self.status == COMPLETED

    def to_dict(self):
        return {"run_id": self.run_id, "pipeline_id": self.pipeline_id,
                "pipeline_version": self.pipeline_version, "status": self.status,
                "output": self.output, "error": self.error, "error_type": self.error_type,
                "failed_stage": self.failed_stage, "output_stage_id": self.output_stage_id,
                "inputs": self.inputs, "started_at": iso(self.started_at),
                "completed_at": iso(self.finished_at), "duration_ms": self.duration_ms,
                "device_id": self.device_id,
                "stages": {k: v.to_dict() for k, v in self.stages.items()},
                "usage": dict(self.usage.to_dict(), duration_ms=self.duration_ms)}


__all__ = ["ExecutionResult", "StageRecord", "Usage", "asdict", "iso", "skipped_marker"]
