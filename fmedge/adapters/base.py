"""The interface every local LLM backend implements (design §7)."""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional

from ..errors import UsageError


@dataclass
class GenerationResult:
    """One finished generation. Token counts are 0 when the backend does not report them."""

    text: str
    model: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_ms: float = 0.0
    raw: Dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens


class LocalLLMAdapter(ABC):
    """Base class: adapters override the coroutine methods below.

    ``generate``/``chat`` return a :class:`GenerationResult`; ``stream`` is an async
    iterator of text pieces. Backend failures raise :class:`fmedge.errors.LLMError`
    subclasses, never an empty "success".
    """

    backend = "base"

    def __init__(self, model: str = ""):
        self.model = model

    @abstractmethod
    async def generate(self, prompt: str, system: Optional[str] = None,
                       temperature: float = 0.7, max_tokens: int = 512,
                       stop: Optional[List[str]] = None, seed: Optional[int] = None,
                       json: bool = False, model: Optional[str] = None) -> GenerationResult:
        """See the class docstring."""

    @abstractmethod
    def stream(self, prompt: str, system: Optional[str] = None, temperature: float = 0.7,
               max_tokens: int = 512, stop: Optional[List[str]] = None,
               seed: Optional[int] = None, model: Optional[str] = None) -> AsyncIterator[str]:
        """See the class docstring."""

    @abstractmethod
    async def chat(self, messages: List[Dict[str, str]], temperature: float = 0.7,
                   max_tokens: int = 512, stop: Optional[List[str]] = None,
                   seed: Optional[int] = None, json: bool = False,
                   model: Optional[str] = None) -> GenerationResult:
        """See the class docstring."""

    @abstractmethod
    async def health(self) -> bool:
        """See the class docstring."""

    @abstractmethod
    async def list_models(self) -> List[str]:
        """See the class docstring."""

    async def close(self) -> None:
        """Release connections or loaded models. Safe to call twice."""


def check_messages(messages):
    """What ``chat`` accepts before a request is made: a list of {role, content} objects."""
    if not isinstance(messages, list):
        raise UsageError(f"chat messages must be a list of {{role, content}} objects, "
                         f"got {type(messages).__name__}")
