"""Local LLM adapters. Importing this package never imports llama_cpp (it loads lazily)."""

from .base import GenerationResult, LocalLLMAdapter

__all__ = ["GenerationResult", "LocalLLMAdapter", "OllamaAdapter", "LlamaCppAdapter",
           "OpenAIAdapter"]


def __getattr__(name):
    # Each backend module is imported on first use: a device running only the Ollama
    # backend never pays for the others' imports (urllib3 included) at start-up.
    modules = {"OllamaAdapter": ".ollama", "LlamaCppAdapter": ".llamacpp",
               "OpenAIAdapter": ".openai"}
    if name not in modules:
        raise AttributeError(f"module 'fmedge.adapters' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(modules[name], __name__), name)
