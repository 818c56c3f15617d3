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
    if timestamp is None:
        return None
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
    return f"{seconds}.{int((timestamp % 1) * 1000):03d}Z"


def skipped_marker(reason="control_flow"):
    """What `{{upstream.<id>}}` shows for a skipped stage (reference §3.6)."""
    return {"skipped": True, "reason": reason}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    models: Dict[str, int] = field(default_factory=dict)

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


@dataclass
class StageRecord:
    """What happened to one stage (or one foreach iteration of a body stage)."""

    stage_id: str
    component_type: str
    status: str
    output: Any = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)

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
                "attempts": self.attempts, "usage": self.usage.to_dict()}


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
