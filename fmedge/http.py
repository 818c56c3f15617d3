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
