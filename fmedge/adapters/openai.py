"""OpenAIAdapter: any OpenAI-compatible server (/v1/chat/completions, /v1/completions).

One small client covers llama.cpp's llama-server, llama-cpp-python's server, LM Studio,
vLLM, LocalAI and Ollama's /v1 (shared/llm-backends.md §5). ``generate`` goes through
chat completions by default: every one of those servers has it, and it applies the
model's chat template, which instruction-tuned models need. ``use_completions=True``
sends raw prompts to /v1/completions instead (base models, or servers without chat).
"""

import logging
import time
from typing import AsyncIterator, Dict, List, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError, LLMError, ModelNotFoundError
from .base import GenerationResult, LocalLLMAdapter, check_messages
from .http import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT,
                   BackendBusyError, HttpClient, HttpStatusError, JsonCalls, decode_json)

logger = logging.getLogger(__name__)

_NAME = "the OpenAI-compatible server"
_START_HINT = ("start the server (llama-server, LM Studio, vLLM, LocalAI, `ollama serve`) "
               "or fix llm_base_url")


class OpenAIAdapter(JsonCalls, LocalLLMAdapter):
    """Talks to one OpenAI-compatible server.

    ``base_url`` is the server's root or its /v1 URL ("http://127.0.0.1:8080" and
    "http://127.0.0.1:8080/v1" mean the same). ``model`` may be empty for servers that
    serve a single model (it is then left out of requests). ``api_key`` is sent as a
    bearer token when given.
    """

    backend = "openai"

    def __init__(self, base_url: Optional[str] = None, model: str = "",
                 api_key: Optional[str] = None, use_completions: bool = False,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        super().__init__(model)
        self.base_url = _v1_url(base_url)
        self.use_completions = use_completions
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = HttpClient(self.base_url, _NAME, _START_HINT, connect_timeout,
                                read_timeout, max_connections, headers)

    def __repr__(self):  # never shows the api_key
        return f"OpenAIAdapter(base_url={self.base_url!r}, model={self.model!r})"

    # -- generation --------------------------------------------------------------------
    async def generate(self, prompt: str, system: Optional[str] = None,
                       temperature: float = 0.7, max_tokens: int = 512,
                       stop: Optional[List[str]] = None, seed: Optional[int] = None,
                       json: bool = False, model: Optional[str] = None) -> GenerationResult:
        if not self.use_completions:
            return await self.chat(_messages(prompt, system), temperature, max_tokens, stop,
                                   seed, json, model)
        name = model or self.model
        body = self._body(name, temperature, max_tokens, stop, seed, json, stream=False)
        body["prompt"] = _raw_prompt(prompt, system)
        started = time.monotonic()
        data = await self._post("/completions", body, name)
        choice = _first_choice(data, self._http.where)
        return _result(data, choice.get("text") or "", choice, name, started)

    async def stream(self, prompt: str, system: Optional[str] = None,
                     temperature: float = 0.7, max_tokens: int = 512,
                     stop: Optional[List[str]] = None, seed: Optional[int] = None,
                     model: Optional[str] = None) -> AsyncIterator[str]:
        name = model or self.model
        body = self._body(name, temperature, max_tokens, stop, seed, False, stream=True)
        if self.use_completions:
            path, body["prompt"] = "/completions", _raw_prompt(prompt, system)
        else:
            path, body["messages"] = "/chat/completions", _messages(prompt, system)
        events = self._events(path, body, name)
        try:
            async for event in events:
                text = _piece(event)
                if text:
                    yield text
        finally:
            await events.aclose()  # stops the HTTP request now if the caller left early

    async def chat(self, messages: List[Dict[str, str]], temperature: float = 0.7,
                   max_tokens: int = 512, stop: Optional[List[str]] = None,
                   seed: Optional[int] = None, json: bool = False,
                   model: Optional[str] = None) -> GenerationResult:
        check_messages(messages)
        name = model or self.model
        body = self._body(name, temperature, max_tokens, stop, seed, json, stream=False)
        body["messages"] = messages
        started = time.monotonic()
        data = await self._post("/chat/completions", body, name)
        choice = _first_choice(data, self._http.where)
        text = (choice.get("message") or {}).get("content") or ""
        return _result(data, text, choice, name, started)

    # -- server and models -------------------------------------------------------------
    async def health(self) -> bool:
        try:
            await self.list_models()
        except (LLMError, HttpStatusError) as exc:
            logger.debug("health check of %s failed: %s", self.base_url, exc)
            return False
        return True

    async def list_models(self) -> List[str]:
        data = await self._get("/models")
        return [str(entry.get("id", "")) for entry in data.get("data") or []
                if isinstance(entry, dict)]

    async def close(self) -> None:
        self._http.close()

    # -- plumbing ----------------------------------------------------------------------
    def _body(self, model, temperature, max_tokens, stop, seed, json_format, stream):
        body = {"stream": stream}
        if model:
            body["model"] = model
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None and max_tokens > 0:
            body["max_tokens"] = max_tokens
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        if json_format:
            body["response_format"] = {"type": "json_object"}
        return body

    async def _events(self, path, body, model):
        """Yield each JSON event of an SSE answer (``data: ...`` lines) up to [DONE].

        Every event is checked for ``error``. A stream that ends without [DONE] is
        accepted only if a finish_reason arrived (some servers omit [DONE]).
        """
        finished = False
        lines = self._http.lines("POST", path, body)
        try:
            async for raw in lines:
                line = raw.strip()
                if finished or not line.startswith(b"data:"):
                    continue  # comments, event:/id: fields, blank separators
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    finished = True
                    continue
                event = decode_json(payload, self._http.where)
                if "error" in event:
                    raise self._stream_error(event, model)
                choices = event.get("choices") or [{}]
                finished = finished or bool(choices[0].get("finish_reason"))
                yield event
        except HttpStatusError as exc:
            raise self._status_error(exc, model) from None
        finally:
            await lines.aclose()
        if not finished:
            raise LLMError(f"{self._http.where} ended the stream from {path} before it was "
                           "finished; the server may have restarted: try again")

    def _stream_error(self, data, model):
        return LLMError(f"{self._http.where} failed while running model {model!r}: "
                        f"{_error_message(data)}; try again, or check the server log")

    def _status_error(self, exc, model):
        body = exc.json() or {}
        message = _error_message(body) if body else exc.text() or "no details"
        where = self._http.where
        if exc.status == 404 and _names_model(body, message):
            return ModelNotFoundError(
                f"{where} has no model {model!r} ({message}); use one listed by GET "
                f"{self.base_url}/models, or load it on the server (Ollama: "
                f"`ollama pull {model}`)")
        if exc.status in (429, 503):
            return BackendBusyError(f"{where} is busy (HTTP {exc.status}: {message}); "
                                    "try again later")
        if exc.status in (401, 403):
            return LLMError(f"{where} refused the API key (HTTP {exc.status}: {message}); "
                            "pass the key the server expects as api_key",
                            code="auth_failed", retryable=False)
        if exc.status == 404:
            return LLMError(f"{where} has no endpoint {exc.url} (HTTP 404: {message}); "
                            "check llm_base_url, or turn use_completions off if the "
                            "server only has chat completions", retryable=False)
        if exc.status < 500:
            return LLMError(f"{where} rejected the request for model {model!r} "
                            f"(HTTP {exc.status}: {message}); check the prompt length and "
                            "options", retryable=False)
        return LLMError(f"{where} failed (HTTP {exc.status}: {message}) for model "
                        f"{model!r}; try again, or check the server log")


def _v1_url(base_url):
    """The /v1 URL: a bare server root gets /v1; any other path is kept as given."""
    if not base_url or not str(base_url).strip():
        raise ConfigError("the openai backend needs llm_base_url, e.g. "
                          "http://127.0.0.1:8080/v1 (llama-server), http://127.0.0.1:1234/v1 "
                          "(LM Studio) or http://127.0.0.1:11434/v1 (Ollama)")
    url = str(base_url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"llm_base_url {url!r} is not an http(s) URL; write it like "
                          "http://127.0.0.1:8080/v1")
    return url if parts.path else url + "/v1"


def _messages(prompt, system):
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": prompt}]


def _raw_prompt(prompt, system):
    return f"{system}\n\n{prompt}" if system else prompt


def _piece(event):
    choice = (event.get("choices") or [{}])[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _first_choice(data, where):
    choices = data.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise LLMError(f"{where} answered without any choice: {str(data)[:200]}; "
                       "check that the server is OpenAI-compatible")
    return choices[0]


def _result(data, text, choice, model, started):
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return GenerationResult(
        text=text, model=data.get("model") or model,
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        duration_ms=(time.monotonic() - started) * 1000.0,  # the API reports no timings
        raw=data)


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _error_message(body):
    """The message of an error body, whatever the server's dialect."""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if error:
        return str(error)
    return str(body.get("message") or body.get("detail") or body)


def _names_model(body, message):
    # A 404 for a missing model (OpenAI, Ollama, vLLM) rather than for a missing path.
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    kinds = (str(error.get("type", "")), str(error.get("code", "")))
    return ("model" in message.lower() or "not_found_error" in kinds
            or "model_not_found" in kinds)
