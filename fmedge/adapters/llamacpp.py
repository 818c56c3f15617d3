"""llama.cpp backend: runs a GGUF model in this process through llama-cpp-python.

Facts this module is built on (shared/llm-backends.md §3, measured on 0.3.36):

- One ``llama_cpp.Llama`` is not thread-safe: concurrent calls abort the process, and two
  interleaved streams silently corrupt each other. Every use of a model (load, call, the
  whole iteration of a stream, unload) therefore holds that model's ``threading.Lock``.
  Models live in a process-wide registry, so two adapters on the same file share one
  model and one lock instead of loading it twice.
- Inference releases the GIL, so it runs in a worker thread and the event loop stays
  responsive.
- Cancelling the awaiting task sets an Event that a ``stopping_criteria`` checks after
  every token, so a run timeout or a user cancel really stops the computation.
- Running to the very end of the context sometimes fails inside llama.cpp, so
  ``max_tokens`` is clamped to ``n_ctx - prompt_tokens - CONTEXT_MARGIN``.

``llama_cpp`` is imported on first use only: importing fm-edge never needs it.
"""

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from ..errors import BackendUnavailableError, LLMError, ModelNotFoundError
from .base import GenerationResult, LocalLLMAdapter

LLAMA_CPP_PIN = "0.3.36"          # the version .ci/install-llama-cpp builds and tests
CONTEXT_MARGIN = 8                # tokens kept free at the end of the context
DEFAULT_N_CTX = 2048
DEFAULT_IDLE_UNLOAD_S = 300.0     # like Ollama's default keep_alive of 5 minutes
GGUF_MAGIC = b"GGUF"

_llama_cpp = None                 # the module, once imported


def import_llama_cpp():
    """Import llama_cpp on first use, or explain exactly how to install it."""
    global _llama_cpp
    if _llama_cpp is None:
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:   # missing, or its .so fails
            raise BackendUnavailableError(
                "the llama.cpp backend needs llama-cpp-python, which does not import in "
                "%s (%s: %s). Install it with: %s -m pip install llama-cpp-python==%s "
                "(it compiles llama.cpp, so it needs a C compiler and cmake), or set "
                "llm_backend to 'ollama'."
                % (sys.executable, type(exc).__name__, exc, sys.executable, LLAMA_CPP_PIN),
                retryable=False,   # not until someone installs it
            ) from exc
        _llama_cpp = llama_cpp
    return _llama_cpp


# -- the process-wide model registry -----------------------------------------------------

class _LoadedModel:
    """One model file with one set of load options; ``llm`` is None while unloaded."""

    def __init__(self):
        self.lock = threading.Lock()    # held for every use of ``llm``, load and unload
        self.llm = None
        self.last_used = 0.0
        self.adapters = 0               # open adapters sharing this entry


_registry = {}                          # (real path, n_ctx, n_threads, n_gpu_layers) -> entry
_registry_lock = threading.Lock()


def _attach(key):
    with _registry_lock:
        entry = _registry.setdefault(key, _LoadedModel())
        entry.adapters += 1
        return entry


def _detach(key):
    """Forget one adapter; return the entry when it was the last one using it."""
    with _registry_lock:
        entry = _registry[key]
        entry.adapters -= 1
        if entry.adapters > 0:
            return None
        del _registry[key]
        return entry


def _unload(entry):
    """Free the model. The caller holds ``entry.lock``."""
    llm, entry.llm = entry.llm, None
    if llm is not None:
        llm.close()


# -- loading and error mapping -----------------------------------------------------------

def _check_model_file(path):
    if not os.path.isfile(path):
        raise ModelNotFoundError(
            "model file %r does not exist: check model_path, or add the file with "
            "`fm-edge models add FILE`" % path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise LLMError(
            "model file %r is not a GGUF file (it starts with %r, not %r): point model_path "
            "at a .gguf model, or download it again" % (path, head, GGUF_MAGIC),
            code="model_invalid", retryable=False)


def _load(path, n_ctx, n_threads, n_gpu_layers, verbose):
    llama_cpp = import_llama_cpp()
    _check_model_file(path)
    try:
        # Explicit threads: llama-cpp-python's own default (cpu_count // 2) halves decode
        # speed on a small board; the prompt (batch) side gets the same number.
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads,
                               n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers,
                               verbose=verbose)
    except ValueError as exc:   # llama-cpp-python reports every load failure this way
        raise LLMError(
            "llama.cpp could not load %r (%s): check that it is a complete GGUF model of an "
            "architecture this llama-cpp-python (%s) supports, and that n_ctx=%d fits in "
            "memory" % (path, exc, LLAMA_CPP_PIN, n_ctx),
            code="model_invalid", retryable=False) from exc


def _context_error(model, prompt_tokens, n_ctx):
    return LLMError(
        "the prompt is %d tokens but model %s has a context of n_ctx=%d, which leaves no "
        "room for a reply (%d tokens are kept free): shorten the prompt or raise n_ctx"
        % (prompt_tokens, model, n_ctx, CONTEXT_MARGIN),
        code="context_length_exceeded", retryable=False)


def _map_generation_error(exc, model):
    """Turn a llama-cpp-python exception into an fm-edge error naming the model."""
    text = str(exc)
    if isinstance(exc, ValueError) and "exceed context window" in text:
        return LLMError("model %s: %s: shorten the prompt or raise n_ctx" % (model, text),
                        code="context_length_exceeded", retryable=False)
    if isinstance(exc, RuntimeError) and "llama_decode" in text:
        return LLMError("model %s ran out of context slots (%s): lower max_tokens or raise "
                        "n_ctx" % (model, text), code="context_full")
    return LLMError("llama.cpp failed while generating with model %s: %s: %s"
                    % (model, type(exc).__name__, text))


# -- requests ----------------------------------------------------------------------------

def _clamped_max_tokens(requested, prompt_tokens, n_ctx, model):
    """``requested`` limited to what fits; None or <= 0 means "as much as fits"."""
    room = n_ctx - prompt_tokens - CONTEXT_MARGIN
    if room < 1:
        raise _context_error(model, prompt_tokens, n_ctx)
    if requested is None or requested <= 0:
        return room
    return min(requested, room)


def _prepare_completion(llm, kwargs, cancel, model):
    """Tokenize the prompt, clamp max_tokens, and add the cancellation check.

    Applied to every ``create_completion`` call, including the one llama-cpp-python's
    chat handlers make, so chat gets the same clamping and cancellation.
    """
    llama_cpp = import_llama_cpp()
    prompt = kwargs.get("prompt", "")
    if isinstance(prompt, str):   # the same tokenization create_completion would do
        prompt = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    kwargs["prompt"] = prompt
    kwargs["max_tokens"] = _clamped_max_tokens(kwargs.get("max_tokens"), len(prompt),
                                               llm.n_ctx(), model)
    criteria = list(kwargs.get("stopping_criteria") or [])
    criteria.append(lambda input_ids, logits: cancel.is_set())
    kwargs["stopping_criteria"] = llama_cpp.StoppingCriteriaList(criteria)
    return kwargs


@contextlib.contextmanager
def _completion_hook(llm, prepare):
    """Route the chat handler's ``llm.create_completion`` calls through ``prepare``.

    create_chat_completion has no ``stopping_criteria`` parameter and does not say how long
    the formatted prompt is; its handlers end in ``llama.create_completion(prompt=...)``,
    so an instance attribute shadowing that method sees the real prompt. Safe because the
    model lock is held: no other call can see the patched instance.
    """
    original = llm.create_completion

    def hooked(*args, **kwargs):
        if args:
            kwargs["prompt"] = args[0]
        return original(**prepare(llm, kwargs))

    llm.create_completion = hooked
    try:
        yield
    finally:
        del llm.create_completion


def _messages(prompt, system):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def _has_chat_template(llm):
    return "tokenizer.chat_template" in llm.metadata


def _chunk_texts(chunks):
    """The text pieces of a completion or chat-completion stream, skipping empty ones."""
    with contextlib.closing(chunks):   # closing the generator stops llama.cpp at once
        for chunk in chunks:
            choice = chunk["choices"][0]
            if "text" in choice:
                text = choice["text"]
            else:
                text = (choice.get("delta") or {}).get("content")
            if text:
                yield text


# -- bridging the worker thread and the event loop --------------------------------------

class _End:
    """Marks the end of a stream in the queue between the worker and the event loop."""


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def _post(loop, callback):
    """Run ``callback`` on the loop's thread; if the loop is already closed, drop it."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:   # the caller and its loop are gone: nobody wants the result
        pass


def _settle(future, result, error):
    if future.done():      # the awaiting task was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _unload_when_free(entry):
    with entry.lock:       # waits for a running call to finish first
        _unload(entry)


# -- the adapter -------------------------------------------------------------------------

log = logging.getLogger("fmedge.llamacpp")


def _thread_count(requested):
    """``requested`` threads, but never more than the cores: llama.cpp threads that share
    a core spin-wait on each other and generation slows down by 6-40x (measured)."""
    cores = os.cpu_count() or 1
    if not requested:
        return cores
    if requested > cores:
        log.warning("n_threads=%d but this device has %d cores: using %d", requested, cores,
                    cores)
    return min(requested, cores)


class LlamaCppAdapter(LocalLLMAdapter):
    """A GGUF model run in-process by llama.cpp.

    ``generate``/``stream`` apply the model's chat template when the GGUF has one (as
    Ollama's /api/generate does), else send ``system + "\\n\\n" + prompt`` as raw text.
    The model is loaded on the first call and unloaded ``idle_unload_s`` seconds after the
    last one (None or 0: never); ``unload_idle(now)`` does that check on demand, with
    ``clock`` (monotonic seconds) as the time source.
    """

    backend = "llamacpp"

    def __init__(self, model_path: str, n_ctx: int = DEFAULT_N_CTX,
                 n_threads: Optional[int] = None, n_gpu_layers: int = 0,
                 idle_unload_s: Optional[float] = DEFAULT_IDLE_UNLOAD_S,
                 verbose: bool = False, clock: Callable[[], float] = time.monotonic):
        super().__init__(model=os.path.basename(model_path))
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = _thread_count(n_threads)
        self.n_gpu_layers = n_gpu_layers
        self.idle_unload_s = idle_unload_s
        self.verbose = verbose
        self.clock = clock
        self._key = (os.path.realpath(model_path), n_ctx, self.n_threads, n_gpu_layers)
        self._entry = _attach(self._key)
        self._closed = False
        self._idle_timer = None

    # -- state ---------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True while the model is in memory."""
        return self._entry.llm is not None

    @property
    def busy(self) -> bool:
        """True while a call or a stream holds the model lock."""
        return self._entry.lock.locked()

    def unload_idle(self, now: Optional[float] = None) -> bool:
        """Unload the model if unused for ``idle_unload_s``; return True if it unloaded.

        Never waits: a model in use is left alone, and its call schedules a new check.
        """
        entry = self._entry
        if not self.idle_unload_s or entry.llm is None:
            return False
        now = self.clock() if now is None else now
        if not entry.lock.acquire(blocking=False):
            return False
        try:
            if entry.llm is None or now - entry.last_used < self.idle_unload_s:
                return False
            _unload(entry)
            return True
        finally:
            entry.lock.release()

    def _schedule_idle_unload(self):
        if not self.idle_unload_s or self._closed:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(self.idle_unload_s,
                                                                 self.unload_idle)

    # -- running work on the model -------------------------------------------------------

    def _ensure_loaded(self):
        """Return the loaded Llama. The caller holds the model lock."""
        if self._closed:
            raise LLMError("the llama.cpp adapter for %s is closed: create a new one"
                           % self.model, code="adapter_closed", retryable=False)
        if self._entry.llm is None:
            self._entry.llm = _load(self.model_path, self.n_ctx, self.n_threads,
                                    self.n_gpu_layers, self.verbose)
        return self._entry.llm

    def _locked_call(self, cancel, call):
        """Worker thread: ``call(llm, cancel)`` under the model lock, unless cancelled."""
        with self._entry.lock:
            try:
                if cancel.is_set():   # cancelled while waiting for the lock
                    return None
                return call(self._ensure_loaded(), cancel)
            except LLMError:
                raise
            except Exception as exc:
                raise _map_generation_error(exc, self.model) from exc
            finally:
                self._entry.last_used = self.clock()

    def _start_worker(self, loop, cancel, call, deliver):
        """Run ``call`` in a new thread, then ``deliver(result, error)`` on the loop."""
        def work():
            try:
                result, error = self._locked_call(cancel, call), None
            except BaseException as exc:   # handed to the awaiting task
                result, error = None, exc
            _post(loop, lambda: deliver(result, error))
            _post(loop, self._schedule_idle_unload)

        threading.Thread(target=work, name="fmedge-llamacpp", daemon=True).start()

    async def _run(self, call):
        """Await ``call(llm, cancel)``; cancelling the awaiting task stops the generation."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        cancel = threading.Event()
        self._start_worker(loop, cancel, call,
                           lambda result, error: _settle(done, result, error))
        try:
            return await done
        except asyncio.CancelledError:
            cancel.set()   # the worker stops after the current token and frees the lock
            raise

    # -- generation ----------------------------------------------------------------------

    def _generate_call(self, llm, cancel, prompt, system, json, stream, options):
        """generate/stream: through the chat template if the model has one, else raw."""
        if _has_chat_template(llm):
            if json:
                options["response_format"] = {"type": "json_object"}
            return self._chat_call(llm, cancel, _messages(prompt, system), stream, options)
        text = "%s\n\n%s" % (system, prompt) if system else prompt
        if json:
            grammar = import_llama_cpp().llama_grammar
            options["grammar"] = grammar.LlamaGrammar.from_string(grammar.JSON_GBNF,
                                                                  verbose=False)
        kwargs = _prepare_completion(llm, dict(options, prompt=text), cancel, self.model)
        return llm.create_completion(stream=stream, **kwargs)

    def _chat_call(self, llm, cancel, messages, stream, options):
        def prepare(llm_, kwargs):
            return _prepare_completion(llm_, kwargs, cancel, self.model)

        # With stream=True the handler still calls create_completion before returning
        # the chunk generator, so the hook is only needed for this call.
        with _completion_hook(llm, prepare):
            return llm.create_chat_completion(messages=messages, stream=stream, **options)

    def _result(self, response, started):
        choice = response["choices"][0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        usage = response.get("usage") or {}
        return GenerationResult(
            text=text, model=self.model, finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            duration_ms=(time.perf_counter() - started) * 1000.0, raw=response)

    def _check_model(self, model):
        """Accept no model, or any name of the served file: its name, stem or path."""
        names = (None, "", self.model, self.model_path, os.path.splitext(self.model)[0])
        if model not in names and not self._is_model_file(model):
            raise ModelNotFoundError(
                "model %r is not served here: this llama.cpp adapter runs only %s (%s); "
                "configure a llama.cpp adapter for that GGUF file, or use the Ollama backend"
                % (model, self.model, self.model_path))

    def _is_model_file(self, name):
        path = os.path.expanduser(name)
        return (os.path.isfile(path) and os.path.isfile(self.model_path)
                and os.path.samefile(path, self.model_path))

    @staticmethod
    def _options(temperature, max_tokens, stop, seed):
        options = {"temperature": temperature, "max_tokens": max_tokens,
                   "stop": list(stop or [])}
        if seed is not None:
            options["seed"] = seed
        return options

    async def generate(self, prompt: str, system: Optional[str] = None,
                       temperature: float = 0.7, max_tokens: int = 512,
                       stop: Optional[List[str]] = None, seed: Optional[int] = None,
                       json: bool = False, model: Optional[str] = None) -> GenerationResult:
        self._check_model(model)
        options = self._options(temperature, max_tokens, stop, seed)

        def call(llm, cancel):
            started = time.perf_counter()
            response = self._generate_call(llm, cancel, prompt, system, json, False, options)
            return self._result(response, started)

        return await self._run(call)

    async def chat(self, messages: List[Dict[str, str]], temperature: float = 0.7,
                   max_tokens: int = 512, stop: Optional[List[str]] = None,
                   seed: Optional[int] = None, json: bool = False,
                   model: Optional[str] = None) -> GenerationResult:
        self._check_model(model)
        options = self._options(temperature, max_tokens, stop, seed)
        if json:
            options["response_format"] = {"type": "json_object"}

        def call(llm, cancel):
            started = time.perf_counter()
            return self._result(self._chat_call(llm, cancel, messages, False, options),
                                started)

        return await self._run(call)

    async def stream(self, prompt: str, system: Optional[str] = None,
                     temperature: float = 0.7, max_tokens: int = 512,
                     stop: Optional[List[str]] = None, seed: Optional[int] = None,
                     model: Optional[str] = None):
        """Yield text pieces as they are generated; the model lock is held throughout."""
        self._check_model(model)
        options = self._options(temperature, max_tokens, stop, seed)
        loop = asyncio.get_running_loop()
        pieces = asyncio.Queue()
        cancel = threading.Event()

        def produce(llm, cancel):
            chunks = self._generate_call(llm, cancel, prompt, system, False, True, options)
            for piece in _chunk_texts(chunks):
                if cancel.is_set():
                    break
                _post(loop, lambda p=piece: pieces.put_nowait(p))

        def deliver(result, error):
            pieces.put_nowait(_Failure(error) if error is not None else _End)

        self._start_worker(loop, cancel, produce, deliver)
        try:
            while True:
                item = await pieces.get()
                if item is _End:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            cancel.set()   # the consumer stopped early or was cancelled: stop generating

    # -- the rest of the interface -------------------------------------------------------

    async def health(self) -> bool:
        """True when llama_cpp imports and the model file is a GGUF file (no load)."""
        try:
            import_llama_cpp()
            _check_model_file(self.model_path)
        except LLMError:
            return False
        return True

    async def list_models(self) -> List[str]:
        return [self.model]

    async def close(self) -> None:
        """Stop using the model; the last adapter sharing it unloads it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        entry = _detach(self._key)
        if entry is not None:
            await asyncio.get_running_loop().run_in_executor(None, _unload_when_free, entry)
