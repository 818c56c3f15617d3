#!/usr/bin/env python3
"""A stand-in for an Ollama server that speaks Ollama's documented HTTP protocol.

Ollama itself cannot run on the CI machines (shared/llm-backends.md §6), so tests and
benchmarks talk to this server instead. It replays the exact shapes of §4 of that file:
NDJSON streams (chunked), ``stream:false`` single objects, optional metrics in
nanoseconds, 404 bodies for unknown models, ``{"error":...}`` lines in the middle of a
stream, 503 when the queue is full, ``/api/pull`` progress lines, and the
OpenAI-compatible ``/v1`` endpoints with SSE, as Ollama serves them. The official
``ollama`` Python client works against it.

Generated text is deterministic: a scripted reply if a test queued one, otherwise
"You said: <prompt>" followed by filler words until ``num_predict`` pieces were sent
(like a model that always runs to its token limit). One piece = one "token".

Command line::

    python3 tools/ollama_standin.py --port 11434 --models llama3.2,qwen2.5:0.5b

From a test::

    with start_standin(models=["llama3.2"]) as standin:
        OllamaAdapter(base_url=standin.url, model="llama3.2")
        standin.script("Hello!")                                  # next reply
        standin.fail("/api/generate", status=503)                 # next answer is a 503
        standin.fail("/api/chat", after=2, error="model crashed")  # error line mid-stream
        standin.configure(token_delay=0.05)                       # slow tokens
        standin.wait_until(lambda s: s.disconnects >= 1, timeout=10)
"""

import argparse
import hashlib
import json
import re
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

VERSION = "0.12.6"
DEFAULT_MODELS = ("llama3.2:latest",)
# Ollama's own messages (server/routes.go, server/sched.go).
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_ERROR = "an error was encountered while running the model"
# Deterministic fake timings, in nanoseconds like Ollama's.
LOAD_NS = 5_000_000
PROMPT_NS_PER_TOKEN = 1_000_000
EVAL_NS_PER_TOKEN = 10_000_000
METRIC_KEYS = ("total_duration", "load_duration", "prompt_eval_count",
               "prompt_eval_duration", "eval_count", "eval_duration")
FILLER = ("edge", "model", "runs", "local", "and", "offline", "with", "small", "steps")
MAX_BODY_BYTES = 32 * 1024 * 1024
MODIFIED_AT = "2025-05-04T17:37:44.706015396-07:00"


@dataclass
class Reply:
    """A scripted reply. ``metrics`` overrides final-line fields; ``omit`` drops keys."""

    text: str
    done_reason: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    omit: Tuple[str, ...] = ()


@dataclass
class Fault:
    """A one-shot misbehaviour for requests to ``path`` ("*" = any).

    ``status`` > 0: answer that HTTP status with ``error`` before anything else.
    ``after`` >= 0: send that many pieces, then an error line (``drop``: hang up instead).
    """

    path: str = "*"
    status: int = 0
    error: str = ""
    after: int = -1
    drop: bool = False
    times: int = 1


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: Dict[str, str]
    body: Any
    outcome: str = ""  # "done", "disconnected", "error", "dropped", "rejected"
    pieces: int = 0  # stream frames / generated pieces actually sent
    client_port: int = 0  # tells connections apart (keep-alive reuse)


@dataclass
class ModelInfo:
    name: str
    size: int = 1_321_098_329
    family: str = "llama"
    parameter_size: str = "1.2B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 4096

    @property
    def digest(self):
        return hashlib.sha256(self.name.encode()).hexdigest()


def full_name(name):
    """Ollama's default tag: "llama3.2" means "llama3.2:latest"."""
    name = str(name or "").strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def split_pieces(text):
    """Split text into token-like pieces; joining them gives the text back."""
    return re.findall(r"\s*\S+|\s+", text)


def now_rfc3339():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def keep_alive_seconds(value, default=300.0):
    """Ollama's keep_alive: a number of seconds or a duration string ("5m", "1h")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value or ""))
    if not match:
        return default
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


# -- What a generation produces ------------------------------------------------------------
@dataclass
class Plan:
    model: str
    pieces: List[str]
    done_reason: str
    prompt_tokens: int
    reply: Optional[Reply]

    @property
    def text(self):
        return "".join(self.pieces)

    def metrics(self, omit_all):
        eval_count = len(self.pieces)
        values = {"load_duration": LOAD_NS, "prompt_eval_count": self.prompt_tokens,
                  "prompt_eval_duration": self.prompt_tokens * PROMPT_NS_PER_TOKEN,
                  "eval_count": eval_count, "eval_duration": eval_count * EVAL_NS_PER_TOKEN}
        values["total_duration"] = (LOAD_NS + values["prompt_eval_duration"]
                                    + values["eval_duration"])
        if self.reply is not None:
            values.update(self.reply.metrics)
        omit = set(METRIC_KEYS if omit_all else ())
        omit.update(self.reply.omit if self.reply else ())
        return {key: value for key, value in values.items() if key not in omit}


def plan_generation(model, prompt, prompt_tokens, options, json_mode, reply, fill):
    """Decide the pieces of one generation, honouring num_predict and stop."""
    limit = options.get("num_predict")
    limit = limit if isinstance(limit, int) and limit >= 0 else None
    if reply is not None:
        pieces, reason = split_pieces(reply.text), reply.done_reason or "stop"
    elif json_mode:
        pieces, reason = split_pieces(json.dumps({"reply": f"You said: {prompt}"})), "stop"
    else:
        pieces, reason = split_pieces(f"You said: {prompt}"), "stop"
        if fill and limit is not None:
            offset = options.get("seed") if isinstance(options.get("seed"), int) else 0
            while len(pieces) < limit:
                pieces.append(" " + FILLER[(offset + len(pieces)) % len(FILLER)])
    if limit is not None and len(pieces) >= limit and (reply is None or len(pieces) > limit):
        pieces, reason = pieces[:limit], "length"
    pieces, reason = _apply_stop(pieces, reason, options.get("stop"))
    return Plan(model, pieces, reason, prompt_tokens, reply)


def _apply_stop(pieces, reason, stop):
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    text = ""
    for index, piece in enumerate(pieces):
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            cut = min(hits)
            last = piece[:len(piece) - (len(text) - cut)]
            return pieces[:index] + ([last] if last else []), "stop"
    return pieces, reason


def count_words(*texts):
    return max(1, sum(len(str(t or "").split()) for t in texts))


def message_text(content):
    if isinstance(content, list):  # OpenAI multi-part content
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


# -- Shared state ----------------------------------------------------------------------------
class StandinState:
    """Everything tests configure and observe; guarded by one condition variable."""

    def __init__(self, models, token_delay, max_queue, omit_metrics, fill, api_key):
        self.cond = threading.Condition(threading.RLock())
        self.models = {}
        for name in models:
            self.add_model(name)
        self.token_delay = token_delay
        self.max_queue = max_queue
        self.omit_metrics = omit_metrics
        self.fill = fill
        self.api_key = api_key
        self.replies = deque()
        self.faults = []
        self.requests = []
        self.in_flight = 0
        self.loaded = {}
        self.counter = 0

    def add_model(self, name, **info):
        with self.cond:
            model = ModelInfo(full_name(name), **info)
            self.models[model.name] = model
            return model

    def find_model(self, name):
        with self.cond:
            return self.models.get(full_name(name)) if name else None

    def take_reply(self):
        with self.cond:
            return self.replies.popleft() if self.replies else None

    def take_fault(self, path):
        with self.cond:
            for fault in self.faults:
                if fault.path in ("*", path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
            return None

    def record(self, request):
        with self.cond:
            self.requests.append(request)
            self.cond.notify_all()

    def finish(self, request, outcome, pieces=None):
        with self.cond:
            request.outcome = outcome
            if pieces is not None:
                request.pieces = pieces
            self.cond.notify_all()

    def admit(self):
        """Take a queue slot for a generation, or refuse (Ollama answers 503)."""
        with self.cond:
            if self.max_queue and self.in_flight >= self.max_queue:
                return False
            self.in_flight += 1
            return True

    def release(self):
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def touch(self, model, keep_alive):
        with self.cond:
            seconds = keep_alive_seconds(keep_alive) if keep_alive is not None else 300.0
            if seconds == 0:
                self.loaded.pop(model, None)
            else:
                forever = seconds < 0
                self.loaded[model] = None if forever else time.time() + seconds

    def next_id(self):
        with self.cond:
            self.counter += 1
            return self.counter


# -- HTTP ------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like Go's net/http
    server_version = "ollama-standin/" + VERSION
    timeout = 120  # idle keep-alive connections do not hold a thread forever

    def setup(self):
        super().setup()
        # Go's net/http sets TCP_NODELAY; without it, headers and body written separately
        # meet Nagle + delayed ACK and every answer waits ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- dispatch ------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    ROUTES = {
        ("GET", "/"): "root", ("HEAD", "/"): "root",
        ("GET", "/api/version"): "version", ("HEAD", "/api/version"): "version",
        ("GET", "/api/tags"): "tags", ("GET", "/api/ps"): "ps",
        ("POST", "/api/show"): "show", ("POST", "/api/generate"): "generate",
        ("POST", "/api/chat"): "chat", ("POST", "/api/pull"): "pull",
        ("DELETE", "/api/delete"): "delete",
        ("GET", "/v1/models"): "v1_models",
        ("POST", "/v1/chat/completions"): "v1_chat", ("POST", "/v1/completions"): "v1_completions",
    }

    @property
    def state(self):
        return self.server.state

    def _dispatch(self, method):
        path = self.path.split("?", 1)[0]
        name = self.ROUTES.get((method, path))
        if name is None and method == "GET" and path.startswith("/v1/models/"):
            name = "v1_model"
        body = self._read_body() if method in ("POST", "DELETE") else b""
        if body is None:
            return
        parsed = self._parse(body)
        request = RecordedRequest(method, path, dict(self.headers.items()), parsed,
                                  client_port=self.client_address[1])
        self.state.record(request)
        self.request_record = request
        if name is None:
            return self._send_text(404, "404 page not found")
        fault = self.state.take_fault(path)
        if fault is not None and fault.status:
            self.state.finish(request, "rejected")
            return self._send_error(fault.status, fault.error or RUNNER_ERROR)
        if method == "POST" and not isinstance(parsed, dict):
            self.state.finish(request, "rejected")
            message = "missing request body" if not body.strip() else f"invalid JSON: {parsed}"
            return self._send_error(400, message)
        getattr(self, "handle_" + name)(parsed if isinstance(parsed, dict) else {}, fault)
        if not request.outcome:
            self.state.finish(request, "done")

    # -- simple endpoints ------------------------------------------------------------------
    def handle_root(self, body, fault):
        self._send_text(200, "Ollama is running")

    def handle_version(self, body, fault):
        self._send_json(200, {"version": VERSION})

    def handle_tags(self, body, fault):
        with self.state.cond:
            models = list(self.state.models.values())
        self._send_json(200, {"models": [_tag_entry(m) for m in models]})

    def handle_ps(self, body, fault):
        now = time.time()
        entries = []
        with self.state.cond:
            for name, expires in list(self.state.loaded.items()):
                model = self.state.models.get(name)
                if model is None or (expires is not None and expires < now):
                    continue
                entry = _tag_entry(model)
                when = datetime.now(timezone.utc) + timedelta(
                    seconds=(expires - now) if expires else 10 ** 9)
                entry.update(expires_at=when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                             size_vram=0, context_length=model.context_length)
                entry.pop("modified_at")
                entries.append(entry)
        self._send_json(200, {"models": entries})

    def handle_show(self, body, fault):
        name = body.get("model") or body.get("name")
        model = self.state.find_model(name)
        if model is None:
            return self._send_error(404, f"model '{name}' not found")
        self._send_json(200, _show_entry(model))

    def handle_delete(self, body, fault):
        name = body.get("model") or body.get("name")
        with self.state.cond:
            model = self.state.models.pop(full_name(name), None) if name else None
        if model is None:
            return self._send_error(404, f"model '{name}' not found")
        self._send_bytes(200, b"", "text/plain; charset=utf-8")

    def handle_v1_models(self, body, fault):
        with self.state.cond:
            names = list(self.state.models)
        if self._refuse_api_key():
            return
        self._send_json(200, {"object": "list", "data": [_v1_model(n) for n in names]})

    def handle_v1_model(self, body, fault):
        if self._refuse_api_key():
            return
        name = self.path.split("?", 1)[0][len("/v1/models/"):]
        model = self.state.find_model(name)
        if model is None:
            return self._send_error(404, f"model '{name}' not found")
        self._send_json(200, _v1_model(model.name))

    # -- pull ------------------------------------------------------------------------------
    def handle_pull(self, body, fault):
        name = body.get("model") or body.get("name")
        if not name:
            return self._send_error(400, "model is required")
        size = ModelInfo(full_name(name)).size
        if body.get("stream", True) is False:
            if fault is not None and fault.after >= 0:
                return self._send_error(500, fault.error or "pull failed")
            self.state.add_model(name)
            return self._send_json(200, {"status": "success"})
        digest = "sha256:" + hashlib.sha256(full_name(name).encode()).hexdigest()
        layer = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size}
        lines = [{"status": "pulling manifest"}, dict(layer)]  # the first omits "completed"
        lines += [dict(layer, completed=size * step // 4) for step in range(1, 5)]
        lines += [{"status": s} for s in ("verifying sha256 digest", "writing manifest",
                                          "removing any unused layers", "success")]
        frames = [_ndjson(line) for line in lines]
        if self._stream(frames, len(frames) - 1, fault, _GenerateStyle.error,
                        "application/x-ndjson"):
            self.state.add_model(name)

    # -- generation ------------------------------------------------------------------------
    def handle_generate(self, body, fault):
        model = self._model_or_404(body.get("model"))
        if model is None:
            return
        prompt = str(body.get("prompt") or "")
        if not prompt and not body.get("images"):
            return self._load_only(model, body, {"response": ""})
        plan = self._plan(model, prompt, count_words(prompt, body.get("system")), body,
                          body.get("format"))
        # Ollama echoes the model name as the request spelled it ("llama3.2").
        style = _GenerateStyle(body["model"], context=not body.get("raw"))
        self._generate(plan, style, body.get("stream", True) is not False, fault)

    def handle_chat(self, body, fault):
        model = self._model_or_404(body.get("model"))
        if model is None:
            return
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        if not messages:
            return self._load_only(model, body, {"message": {"role": "assistant",
                                                              "content": ""}})
        prompt = _last_user_text(messages)
        tokens = count_words(*(message_text(m.get("content")) for m in messages))
        plan = self._plan(model, prompt, tokens, body, body.get("format"))
        self._generate(plan, _ChatStyle(body["model"]), body.get("stream", True) is not False,
                       fault)

    def handle_v1_chat(self, body, fault):
        if self._refuse_api_key():
            return
        model = self._model_or_404(body.get("model"))
        if model is None:
            return
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        prompt = _last_user_text(messages)
        tokens = count_words(*(message_text(m.get("content")) for m in messages))
        plan = self._plan(model, prompt, tokens, _v1_as_ollama(body), _v1_format(body))
        style = _OpenAIStyle(body["model"], "chat", self.state.next_id(),
                             _include_usage(body))
        self._generate(plan, style, bool(body.get("stream")), fault)

    def handle_v1_completions(self, body, fault):
        if self._refuse_api_key():
            return
        model = self._model_or_404(body.get("model"))
        if model is None:
            return
        prompt = str(body.get("prompt") or "")
        plan = self._plan(model, prompt, count_words(prompt), _v1_as_ollama(body),
                          _v1_format(body))
        style = _OpenAIStyle(body["model"], "completion", self.state.next_id(),
                             _include_usage(body))
        self._generate(plan, style, bool(body.get("stream")), fault)

    def _plan(self, model, prompt, prompt_tokens, body, format_):
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        self.state.touch(model.name, body.get("keep_alive"))
        return plan_generation(model.name, prompt, prompt_tokens, options, bool(format_),
                               self.state.take_reply(), self.state.fill)

    def _load_only(self, model, body, empty):
        keep_alive = body.get("keep_alive")
        self.state.touch(model.name, keep_alive)
        unload = keep_alive is not None and keep_alive_seconds(keep_alive) == 0
        answer = {"model": body["model"], "created_at": now_rfc3339(), **empty, "done": True,
                  "done_reason": "unload" if unload else "load"}
        self.state.finish(self.request_record, "done")
        self._send_json(200, answer)

    def _generate(self, plan, style, stream, fault):
        if not self.state.admit():
            self.state.finish(self.request_record, "rejected")
            return self._send_error(503, BUSY_MESSAGE)
        try:
            if stream:
                metrics = plan.metrics(self.state.omit_metrics)
                frames = [style.piece(p) for p in plan.pieces] + style.final(plan, metrics)
                self._stream(frames, len(plan.pieces), fault, style.error, style.content_type)
            else:
                self._whole(plan, style, fault)
        finally:
            self.state.release()

    def _whole(self, plan, style, fault):
        """stream:false: compute every piece (pausing like a model), then one object."""
        request = self.request_record
        for index in range(len(plan.pieces)):
            if fault is not None and fault.after == index:
                return self._fail_mid_stream(fault, index, streaming=False, error=style.error)
            if not self._pause():
                return self.state.finish(request, "disconnected", index)
        if fault is not None and fault.after >= len(plan.pieces):
            return self._fail_mid_stream(fault, len(plan.pieces), False, style.error)
        self.state.finish(request, "done", len(plan.pieces))
        self._send_json(200, style.whole(plan, plan.metrics(self.state.omit_metrics)))

    def _stream(self, frames, pieces, fault, error_frame, content_type):
        """Send frames as a chunked stream, pausing before each of the first ``pieces``.

        Returns True when the whole stream was delivered.
        """
        request = self.request_record
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, frame in enumerate(frames):
            if fault is not None and fault.after == index:
                return self._fail_mid_stream(fault, index, True, error_frame)
            if index < pieces and not self._pause():
                self.state.finish(request, "disconnected", index)
                return False
            if not self._write_chunk(frame):
                self.state.finish(request, "disconnected", index)
                return False
        self._write_chunk(b"")
        self.state.finish(request, "done", len(frames))
        return True

    def _fail_mid_stream(self, fault, index, streaming, error):
        request = self.request_record
        message = fault.error or RUNNER_ERROR
        if fault.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.state.finish(request, "dropped", index)
            return False
        self.state.finish(request, "error", index)
        if not streaming:  # Ollama answers a proper error status before streaming starts
            self._send_error(500, message)
            return False
        self._write_chunk(error(message))
        self._write_chunk(b"")
        return False

    # -- low-level I/O ---------------------------------------------------------------------
    def _pause(self):
        """Wait token_delay like a generating model; False when the client hung up."""
        delay = self.state.token_delay
        if delay <= 0:
            return True
        readable, _, _ = select.select([self.connection], [], [], delay)
        if not readable:
            return True
        try:
            data = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            self.close_connection = True
            return False
        time.sleep(delay)  # stray bytes from the client: still wait, do not spin
        return True

    def _write_chunk(self, data):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:  # BrokenPipeError, ConnectionResetError: the client left
            self.close_connection = True
            return False
        return True

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._send_error(400 if length < 0 else 413, "bad Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked_body(self):
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                self._send_error(413, "request body too large")
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    @staticmethod
    def _parse(body):
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError as exc:
            return str(exc)

    def _model_or_404(self, name):
        if not name or not isinstance(name, str):
            self.state.finish(self.request_record, "rejected")
            self._send_error(400, "model is required")
            return None
        model = self.state.find_model(name)
        if model is None:
            self.state.finish(self.request_record, "rejected")
            self._send_error(404, f'model "{name}" not found, try pulling it first')
        return model

    def _refuse_api_key(self):
        expected = self.state.api_key  # real Ollama ignores keys; tests may demand one
        if expected and self.headers.get("Authorization") != f"Bearer {expected}":
            self.state.finish(self.request_record, "rejected")
            self._send_error(401, "Incorrect API key provided")
            return True
        return False

    def _send_error(self, status, message):
        if self.path.startswith("/v1/"):
            kind = {400: "invalid_request_error", 401: "invalid_request_error",
                    404: "not_found_error"}.get(status, "api_error")
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        else:
            body = {"error": message}
        self._send_json(status, body)

    def _send_json(self, status, obj):
        self._send_bytes(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _send_text(self, status, text):
        self._send_bytes(status, text.encode(), "text/plain; charset=utf-8")

    def _send_bytes(self, status, data, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(data)
            except OSError:
                self.close_connection = True

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


# -- Answer shapes ---------------------------------------------------------------------------
def _ndjson(obj):
    return json.dumps(obj).encode() + b"\n"


def _sse(obj):
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class _GenerateStyle:
    """/api/generate: ``response`` pieces; the final line carries metrics and context."""

    content_type = "application/x-ndjson"

    def __init__(self, model, context):
        self.model = model
        self.context = context

    def _head(self):
        return {"model": self.model, "created_at": now_rfc3339()}

    def piece(self, text):
        return _ndjson({**self._head(), "response": text, "done": False})

    def _end(self, plan, metrics, text):
        end = {**self._head(), "response": text, "done": True}
        if "done_reason" not in (plan.reply.omit if plan.reply else ()):
            end["done_reason"] = plan.done_reason
        if self.context:
            end["context"] = list(range(1, min(plan.prompt_tokens + len(plan.pieces), 16) + 1))
        end.update(metrics)
        return end

    def final(self, plan, metrics):
        return [_ndjson(self._end(plan, metrics, ""))]

    def whole(self, plan, metrics):
        return self._end(plan, metrics, plan.text)

    @staticmethod
    def error(message):
        return _ndjson({"error": message})


class _ChatStyle(_GenerateStyle):
    """/api/chat: ``message`` pieces; no context."""

    def __init__(self, model):
        super().__init__(model, context=False)

    def piece(self, text):
        return _ndjson({**self._head(), "message": {"role": "assistant", "content": text},
                        "done": False})

    def _end(self, plan, metrics, text):
        end = super()._end(plan, metrics, text)
        del end["response"]
        end["message"] = {"role": "assistant", "content": text}
        return _reorder(end)


def _reorder(end):
    # Ollama sends model, created_at, message, done, done_reason, then metrics.
    first = ("model", "created_at", "message")
    return {**{k: end[k] for k in first}, **{k: v for k, v in end.items() if k not in first}}


class _OpenAIStyle:
    """/v1/chat/completions and /v1/completions as Ollama's compatibility layer sends them."""

    content_type = "text/event-stream"

    def __init__(self, model, kind, number, include_usage):
        self.model = model
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + str(number)
        self.created = int(time.time())
        self.include_usage = include_usage

    def _envelope(self, obj_type, choices):
        return {"id": self.id, "object": obj_type, "created": self.created,
                "model": self.model, "system_fingerprint": "fp_ollama", "choices": choices}

    def _choice(self, text, finish_reason):
        if self.kind == "chat":
            return {"index": 0, "delta": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason}
        return {"text": text, "index": 0, "finish_reason": finish_reason}

    def _chunk_type(self):
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def piece(self, text):
        return _sse(self._envelope(self._chunk_type(), [self._choice(text, None)]))

    def final(self, plan, metrics):
        frames = [_sse(self._envelope(self._chunk_type(),
                                      [self._choice("", _finish_reason(plan))]))]
        if self.include_usage:
            usage = self._envelope(self._chunk_type(), [])
            usage["usage"] = _usage(plan, metrics)
            frames.append(_sse(usage))
        return frames + [b"data: [DONE]\n\n"]

    def whole(self, plan, metrics):
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": plan.text},
                      "finish_reason": _finish_reason(plan)}
            answer = self._envelope("chat.completion", [choice])
        else:
            choice = {"text": plan.text, "index": 0, "finish_reason": _finish_reason(plan)}
            answer = self._envelope("text_completion", [choice])
        answer["usage"] = _usage(plan, metrics)
        return answer

    @staticmethod
    def error(message):
        return _sse({"error": {"message": message, "type": "api_error", "param": None,
                               "code": None}})


def _finish_reason(plan):
    return "length" if plan.done_reason == "length" else "stop"


def _usage(plan, metrics):
    prompt = metrics.get("prompt_eval_count", 0)
    completion = metrics.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _include_usage(body):
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _v1_as_ollama(body):
    """Map OpenAI request fields to Ollama options, as Ollama's middleware does."""
    options = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int):
        options["num_predict"] = limit
    for key in ("temperature", "seed", "stop", "top_p"):
        if body.get(key) is not None:
            options[key] = body[key]
    return {"options": options, "keep_alive": body.get("keep_alive")}


def _v1_format(body):
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        return response_format.get("type") in ("json_object", "json_schema")
    return False


def _last_user_text(messages):
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return message_text(messages[-1].get("content")) if messages else ""


def _details(model):
    return {"parent_model": "", "format": "gguf", "family": model.family,
            "families": [model.family], "parameter_size": model.parameter_size,
            "quantization_level": model.quantization_level}


def _tag_entry(model):
    return {"name": model.name, "model": model.name, "modified_at": MODIFIED_AT,
            "size": model.size, "digest": model.digest, "details": _details(model)}


def _show_entry(model):
    arch = model.family
    return {
        "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {model.name}\n",
        "parameters": 'stop "<|im_end|>"',
        "template": "{{ .Prompt }}",
        "details": _details(model),
        "model_info": {"general.architecture": arch, "general.parameter_count": 1_235_814_432,
                       f"{arch}.context_length": model.context_length,
                       f"{arch}.embedding_length": 2048},
        "capabilities": ["completion"],
        "modified_at": MODIFIED_AT,
    }


def _v1_model(name):
    return {"id": name, "object": "model", "created": 1746405464, "owned_by": "library"}


# -- Server ----------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, state, verbose):
        self.state = state
        self.verbose = verbose
        self._open = set()
        self._open_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def hang_up_all(self):
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


class Standin:
    """The stand-in server plus the knobs tests turn. See the module docstring."""

    def __init__(self, models=DEFAULT_MODELS, host="127.0.0.1", port=0, token_delay=0.0,
                 max_queue=0, omit_metrics=False, fill=True, api_key=None, verbose=False):
        self.state = StandinState(models, token_delay, max_queue, omit_metrics, fill, api_key)
        self._server = _Server((host, port), self.state, verbose)
        self._thread = None

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def url(self):
        host = self._server.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self):
        # A short poll interval makes stop() quick (tests start one server each).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="ollama-standin", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        self._server.serve_forever()

    def stop(self):
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.hang_up_all()
        self._server.server_close()

    def __enter__(self):
        return self if self._thread else self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- knobs -----------------------------------------------------------------------------
    def configure(self, **settings):
        """Change token_delay, max_queue, omit_metrics, fill or api_key on the fly."""
        with self.state.cond:
            for key, value in settings.items():
                if key not in ("token_delay", "max_queue", "omit_metrics", "fill", "api_key"):
                    raise TypeError(f"unknown stand-in setting {key!r}")
                setattr(self.state, key, value)

    def script(self, *replies):
        """Queue replies (str or Reply) for the next generations, in order."""
        with self.state.cond:
            for reply in replies:
                self.state.replies.append(reply if isinstance(reply, Reply) else Reply(reply))

    def fail(self, path="*", status=0, error="", after=-1, drop=False, times=1):
        """Make the next ``times`` requests to ``path`` misbehave (see Fault)."""
        with self.state.cond:
            self.state.faults.append(Fault(path, status, error, after, drop, times))

    def add_model(self, name, **info):
        return self.state.add_model(name, **info)

    # -- observations ----------------------------------------------------------------------
    @property
    def requests(self):
        with self.state.cond:
            return list(self.state.requests)

    def requests_to(self, path):
        return [r for r in self.requests if r.path == path]

    @property
    def disconnects(self):
        return sum(1 for r in self.requests if r.outcome == "disconnected")

    def wait_until(self, predicate, timeout=10.0):
        """Block until ``predicate(self)`` is true (re-checked on every change)."""
        with self.state.cond:
            return self.state.cond.wait_for(lambda: predicate(self), timeout)


def start_standin(**settings):
    """Start a stand-in on an ephemeral 127.0.0.1 port in a thread; ``stop()`` it after."""
    return Standin(**settings).start()


def main(argv=None):
    parser = argparse.ArgumentParser(description="A stand-in Ollama server (protocol only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model names (default: %(default)s)")
    parser.add_argument("--token-delay", type=float, default=0.0,
                        help="seconds between generated pieces")
    parser.add_argument("--max-queue", type=int, default=0,
                        help="generations at once before answering 503 (0: no limit)")
    parser.add_argument("--omit-metrics", action="store_true",
                        help="leave the optional metrics out of final lines")
    parser.add_argument("--no-fill", action="store_true",
                        help="stop after the echo instead of filling up to num_predict")
    parser.add_argument("--api-key", help="require this bearer key on /v1 (Ollama does not)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m.strip()]
    standin = Standin(models, args.host, args.port, args.token_delay, args.max_queue,
                      args.omit_metrics, not args.no_fill, args.api_key, args.verbose)
    print(f"ollama stand-in listening on {standin.url} (models: {', '.join(models)})",
          flush=True)
    try:
        standin.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        standin._server.server_close()


if __name__ == "__main__":
    main()
