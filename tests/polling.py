"""Waiting for a condition in a test: poll it with a deadline, never sleep a fixed time."""

import asyncio


async def wait_until(predicate, timeout=10.0):
    """Poll ``predicate`` (in the running event loop) until true; fail the test if the
    deadline passes first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.001)
