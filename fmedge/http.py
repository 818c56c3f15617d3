"""The process-wide urllib3 pool for components that call out (TLS always verified)."""

import threading

_POOL = None
_LOCK = threading.Lock()


def shared_pool():
    """One PoolManager per process: connections are reused across stages and runs."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            import urllib3

            _POOL = urllib3.PoolManager(num_pools=16, maxsize=8, retries=False)
        return _POOL


def body_chunks(response, size=1024 * 1024, fallback=64 * 1024):
    """A urllib3 response body as it arrives.

    ``read1`` hands over what one read got (up to ``size``), so a cut connection loses no
    byte already received and big reads keep the per-chunk cost low; ``stream(n)``
    (urllib3 2.0 lacks read1) waits for n bytes and drops them on a timeout, so it gets
    the small ``fallback`` size.
    """
    read1 = getattr(response, "read1", None)
    if read1 is None:
        yield from response.stream(fallback, decode_content=False)
        return
    while True:
        chunk = read1(size, decode_content=False)
        if not chunk:
            return
        yield chunk
