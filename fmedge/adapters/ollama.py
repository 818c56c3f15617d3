"""OllamaAdapter: Ollama's REST API (/api/*) over raw HTTP with urllib3.

Facts used here (shared/llm-backends.md §4): answers stream as NDJSON and any line may
be ``{"error": ...}`` once streaming has started (the status then stays 200); metrics and
``done_reason`` are optional; durations are nanoseconds; 404 means the model is missing
and 503 that the server's queue is full.
"""

import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from ..defaults import DEFAULT_LLM_MODEL
from ..errors import LLMError, ModelNotFoundError, UsageError
from ..ollama_host import parse_ollama_host
from .base import GenerationResult, LocalLLMAdapter, check_messages
from .http import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT,
                   BackendBusyError, HttpClient, HttpStatusError, JsonCalls, decode_json)

logger = logging.getLogger(__name__)

_NS_PER_MS = 1_000_000
_START_HINT = ("start it with `ollama serve`, or point OLLAMA_HOST / llm_base_url at the "
               "address it listens on")


@dataclass
class PullProgress:
    """One progress line of ``ollama pull``; byte counts are None when not sent."""

    status: str
    digest: Optional[str] = None
    total: Optional[int] = None
    completed: Optional[int] = None

    @property
    def fraction(self) -> Optional[float]:
        if self.total and self.completed is not None:
            return self.completed / self.total
        return None


class OllamaAdapter(JsonCalls, LocalLLMAdapter):
    """Talks to one Ollama server.

    ``base_url`` None (or empty) means ``OLLAMA_HOST``, parsed as Ollama parses it.
    ``keep_alive`` ("5m", "1h", seconds, -1 = forever) is sent with every generation:
    on an edge device, pinning the model avoids a reload before each run.
    """

    backend = "ollama"

    def __init__(self, base_url: Optional[str] = None, model: str = DEFAULT_LLM_MODEL,
                 keep_alive: Any = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        super().__init__(model)
        self.base_url = parse_ollama_host(base_url or os.environ.get("OLLAMA_HOST", ""))
        self.keep_alive = keep_alive
        self._http = HttpClient(self.base_url, "Ollama", _START_HINT, connect_timeout,
                                read_timeout, max_connections)

    def __repr__(self):
        return f"OllamaAdapter(base_url={self.base_url!r}, model={self.model!r})"

    # -- generation --------------------------------------------------------------------
    async def generate(self, prompt: str, system: Optional[str] = None,
                       temperature: float = 0.7, max_tokens: int = 512,
                       stop: Optional[List[str]] = None, seed: Optional[int] = None,
                       json: bool = False, model: Optional[str] = None) -> GenerationResult:
        name = self._model(model)
        body = self._body(name, temperature, max_tokens, stop, seed, json, stream=False)
        body["prompt"] = prompt
        if system is not None:
            body["system"] = system
        started = time.monotonic()
        data = await self._post("/api/generate", body, name)
        data.pop("context", None)  # deprecated token list: large and of no use here
        return _result(data, data.get("response") or "", name, started)

    async def stream(self, prompt: str, system: Optional[str] = None,
                     temperature: float = 0.7, max_tokens: int = 512,
                     stop: Optional[List[str]] = None, seed: Optional[int] = None,
                     model: Optional[str] = None) -> AsyncIterator[str]:
        name = self._model(model)
        body = self._body(name, temperature, max_tokens, stop, seed, False, stream=True)
        body["prompt"] = prompt
        if system is not None:
            body["system"] = system
        parts = self._ndjson("/api/generate", body, name, _is_done)
        try:
            async for part in parts:
                if part.get("response"):
                    yield part["response"]
        finally:
            await parts.aclose()  # stops the HTTP request now if the caller left early

    async def chat(self, messages: List[Dict[str, str]], temperature: float = 0.7,
                   max_tokens: int = 512, stop: Optional[List[str]] = None,
                   seed: Optional[int] = None, json: bool = False,
                   model: Optional[str] = None) -> GenerationResult:
        name = self._model(model)
        check_messages(messages)
        body = self._body(name, temperature, max_tokens, stop, seed, json, stream=False)
        body["messages"] = messages
        started = time.monotonic()
        data = await self._post("/api/chat", body, name)
        text = (data.get("message") or {}).get("content") or ""
        return _result(data, text, name, started)

    # -- server and models -------------------------------------------------------------
    async def version(self) -> str:
        """The server's version (GET /api/version)."""
        data = await self._get("/api/version")
        return str(data.get("version", ""))

    async def health(self) -> bool:
        try:
            await self.version()
        except (LLMError, HttpStatusError) as exc:
            logger.debug("Ollama health check failed: %s", exc)
            return False
        return True

    async def list_models(self) -> List[str]:
        data = await self._get("/api/tags")
        return [entry.get("name") or entry.get("model") or ""
                for entry in data.get("models") or []]

    async def pull(self, model: Optional[str] = None,
                   progress: Optional[Callable[[PullProgress], Any]] = None) -> str:
        """Download ``model`` into Ollama; ``progress`` (sync or async) sees each line.

        Returns the final status ("success"). Error lines raise: ModelNotFoundError when
        the registry has no such model, a retryable LLMError otherwise (pulls resume).
        """
        name = self._model(model)
        last = ""
        lines = self._ndjson("/api/pull", {"model": name, "stream": True}, name,
                             _is_pull_done, on_error=self._pull_error)
        try:
            async for part in lines:
                last = str(part.get("status", ""))
                if progress is not None:
                    outcome = progress(_progress(part))
                    if inspect.isawaitable(outcome):
                        await outcome
        finally:
            await lines.aclose()
        return last

    async def close(self) -> None:
        self._http.close()

    # -- plumbing ----------------------------------------------------------------------
    def _model(self, model):
        name = model or self.model
        if not name:
            raise UsageError("no model given: pass model=... or set llm_model "
                             "(e.g. `fm-edge config set llm_model llama3.2`)")
        return name

    def _body(self, model, temperature, max_tokens, stop, seed, json_format, stream):
        options = {}
        if temperature is not None:
            options["temperature"] = temperature
        if max_tokens is not None and max_tokens > 0:  # Ollama: unset/-1 = no limit
            options["num_predict"] = max_tokens
        if stop:
            options["stop"] = list(stop)
        if seed is not None:
            options["seed"] = seed
        body = {"model": model, "stream": stream, "options": options}
        if json_format:
            # True asks for any JSON; a dict is passed on as a JSON schema.
            body["format"] = json_format if isinstance(json_format, dict) else "json"
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    async def _ndjson(self, path, body, model, is_last, on_error=None):
        """Yield each JSON line of a streamed answer up to the last one.

        Every line is checked for ``error``; an answer that ends before its last line
        (``done`` / ``success``) is an error too, never a short "success".
        """
        on_error = on_error or self._stream_error
        finished = False
        lines = self._http.lines("POST", path, body)
        try:
            async for line in lines:
                if finished or not line.strip():
                    continue  # read on to the end so the connection can be reused
                part = decode_json(line, self._http.where)
                if "error" in part:
                    raise on_error(part, model)
                finished = is_last(part)
                yield part
        except HttpStatusError as exc:
            raise self._status_error(exc, model) from None
        finally:
            await lines.aclose()
        if not finished:
            raise LLMError(f"{self._http.where} ended the answer to {path} for model "
                           f"{model!r} before it was finished; the server may have "
                           "restarted: try again")

    def _stream_error(self, part, model):
        return LLMError(f"{self._http.where} failed while running model {model!r}: "
                        f"{part.get('error')}; try again, or check the Ollama server log")

    def _pull_error(self, part, model):
        message = str(part.get("error"))
        where = self._http.where
        if "file does not exist" in message or "not found" in message:
            return ModelNotFoundError(
                f"the registry behind {where} has no model {model!r} ({message}); check "
                "the name and tag (e.g. llama3.2:1b)")
        return LLMError(f"{where} could not pull {model!r}: {message}; try again (the "
                        "download resumes where it stopped)")

    def _status_error(self, exc, model):
        body = exc.json() or {}
        message = str(body.get("error") or exc.text() or "no details")
        where = self._http.where
        if exc.status == 404 and model and "error" in body and "not found" in message.lower():
            return ModelNotFoundError(
                f"{where} has no model {model!r} ({message}); download it with "
                f"`ollama pull {model}` (or `fm-edge models pull {model}`)")
        if exc.status in (429, 503):
            return BackendBusyError(
                f"{where} is busy (HTTP {exc.status}: {message}); try again later, or "
                "raise OLLAMA_MAX_QUEUE / OLLAMA_NUM_PARALLEL on the server")
        if exc.status == 404:
            return LLMError(f"{where} has no endpoint {exc.url} (HTTP 404: {message}); "
                            "check that llm_base_url / OLLAMA_HOST points at Ollama",
                            retryable=False)
        if exc.status < 500:
            return LLMError(f"{where} rejected the request for model {model!r} "
                            f"(HTTP {exc.status}: {message}); check the options sent",
                            retryable=False)
        return LLMError(f"{where} failed (HTTP {exc.status}: {message}) for model "
                        f"{model!r}; try again, or check the Ollama server log")


def _is_done(part):
    return bool(part.get("done"))


def _is_pull_done(part):
    return part.get("status") == "success"


def _progress(part):
    return PullProgress(status=str(part.get("status", "")), digest=part.get("digest"),
                        total=_int_or_none(part.get("total")),
                        completed=_int_or_none(part.get("completed")))


def _result(data, text, model, started):
    """Build a GenerationResult; every metric is optional (Ollama omits empty ones)."""
    total_ns = data.get("total_duration")
    if isinstance(total_ns, (int, float)):
        duration_ms = total_ns / _NS_PER_MS
    else:  # not reported: our own clock is the next best measure
        duration_ms = (time.monotonic() - started) * 1000.0
    return GenerationResult(
        text=text, model=data.get("model") or model,
        finish_reason=data.get("done_reason") or "stop",
        prompt_tokens=_int_or_none(data.get("prompt_eval_count")) or 0,
        completion_tokens=_int_or_none(data.get("eval_count")) or 0,
        duration_ms=duration_ms, raw=data)


def _int_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None
