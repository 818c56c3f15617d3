"""Running blocking store calls from async code without blocking the event loop."""


async def run_blocking(function, *args):
    """Run ``function(*args)`` in the default thread pool and return its result.

    SQLite commits with synchronous=FULL wait for fsync (milliseconds): done on the event
    loop, they would stall every other run and the HTTP API meanwhile.
    """
    import asyncio  # imported here: the CLI's fast paths never need asyncio

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: function(*args))
