"""Real servers the LLM adapter tests talk to: the Ollama stand-in, and a closed port.

Import the fixtures into a test module (``from peers import standin, refused_url``).
"""

import asyncio
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.ollama_standin import Reply, start_standin  # noqa: E402

MODELS = ["llama3.2", "qwen2.5:0.5b"]
# A safety net so a broken adapter fails the test instead of hanging the suite; no
# assertion depends on it.
HANG_GUARD_S = 60

__all__ = ["Reply", "run", "using", "collect", "standin", "refused_url", "MODELS"]


def run(coro):
    """Run one coroutine on a fresh event loop."""
    return asyncio.run(asyncio.wait_for(coro, HANG_GUARD_S))


async def using(adapter, call):
    """``await call(adapter)``, then close the adapter whatever happened."""
    try:
        return await call(adapter)
    finally:
        await adapter.close()


async def collect(aiterator):
    return [piece async for piece in aiterator]


@pytest.fixture
def standin():
    server = start_standin(models=MODELS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def refused_url():
    """A loopback URL whose port refuses connections: bound (so nobody else takes it)
    but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
