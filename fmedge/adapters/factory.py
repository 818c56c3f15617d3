"""Backend selection: the LLM adapter an EdgeConfig asks for (design §7)."""

import os

from ..errors import ConfigError, ModelNotFoundError


def create_adapter(config, model=None):
    """An adapter for ``config.llm_backend``; ``model`` (a stage override) wins over
    ``config.llm_model``."""
    name = model or config.llm_model
    backend = config.llm_backend
    if backend == "ollama":
        from .ollama import OllamaAdapter

        return OllamaAdapter(base_url=config.effective_llm_base_url(), model=name)
    if backend == "openai":
        from .openai import OpenAIAdapter

        if not config.llm_base_url:
            raise ConfigError("llm_backend is openai but llm_base_url is empty: set it to the "
                              "server's URL, e.g. `fm-edge config set llm_base_url "
                              "http://127.0.0.1:8000`")
        return OpenAIAdapter(base_url=config.llm_base_url, model=name,
                             api_key=config.llm_api_key or None)
    if backend == "llamacpp":
        from .llamacpp import LlamaCppAdapter

        return LlamaCppAdapter(model_path=model_path(config, name), n_ctx=config.llm_context,
                               n_threads=llama_threads(config),
                               n_gpu_layers=config.llm_gpu_layers)
    raise ConfigError(f"unknown llm_backend {backend!r}: use ollama, llamacpp or openai")


def llama_threads(config):
    """The configured thread count, or all cores but one (at least one)."""
    if config.llm_threads:
        return config.llm_threads
    return max(1, (os.cpu_count() or 2) - 1)


def model_path(config, name):
    """A GGUF path for the llama.cpp backend: ``name`` as a path, or a cached model's file."""
    candidates = [os.path.expanduser(name)]
    if os.sep not in name:
        base = os.path.join(config.model_cache_dir, name)
        candidates += [base, base + ".gguf"]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ModelNotFoundError(f"model {name!r} is neither a GGUF file nor in the model cache "
                             f"{config.model_cache_dir}: import it with `fm-edge models add "
                             "FILE` or set llm_model to the file's path")
