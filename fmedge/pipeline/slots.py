"""Run slots: at most ``max_concurrent`` runs at once, up to ``max_queued_runs`` waiting.

Shared by runs started in the runtime's event loop and runs started in other threads
(the HTTP API's workers run pipelines whose stages never wait themselves, see
``EdgeExecutor.execute``), so unlike asyncio.Semaphore, which this replaces, every change
happens under a thread lock. A free slot is taken at once from any thread; waiting for
one happens in an event loop, first come, first served. A slot given back while runs
wait passes straight to the first of them (in its loop), so a newcomer cannot overtake.
"""

import asyncio
import collections
import threading

RUN, WAIT = "run", "wait"


class Slots:
    def __init__(self, count):
        self._lock = threading.Lock()
        self._free = count
        self._waiters = collections.deque()   # asyncio futures of queued runs, in order
        self.running = 0
        self.queued = 0        # admitted to wait: in the queue, or on their way to it

    def admit(self, max_queued):
        """RUN (a slot is taken), WAIT (a place in the queue is taken: call ``wait``, or
        ``leave`` if the run ends before) or None (the queue is full)."""
        with self._lock:
            if self._free > 0 and not self.queued:
                self._free -= 1
                self.running += 1
                return RUN
            if self.queued >= max_queued:
                return None
            self.queued += 1
            return WAIT

    async def wait(self):
        """After ``admit`` said WAIT, in an event loop: returns holding a slot. Cancelled,
        it holds none (and its place is given up)."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._free > 0 and not self._waiters:     # one came free meanwhile
                self._free -= 1
                self.running += 1
                self.queued -= 1
                return
            self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            self._withdraw(future)
            raise

    def leave(self):
        """Give up a place in the queue that ``wait`` was never called for."""
        with self._lock:
            self.queued -= 1

    def give_back(self):
        """Return a slot (from any thread): to the first waiting run, else to the pool."""
        with self._lock:
            while self._waiters:
                future = self._waiters.popleft()
                try:
                    future.get_loop().call_soon_threadsafe(self._grant, future)
                    return             # the slot passes on: still running, by another
                except RuntimeError:   # that loop is closed: nobody waits there any more
                    self.queued -= 1
            self.running -= 1
            self._free += 1

    def _grant(self, future):
        with self._lock:
            self.queued -= 1
        if future.done():     # its run was cancelled while the slot was on its way
            self.give_back()
        else:
            future.set_result(None)

    def _withdraw(self, future):
        with self._lock:
            try:
                self._waiters.remove(future)
            except ValueError:
                pass          # a slot is on its way to it (see below)
            else:
                self.queued -= 1
                return
        if future.done() and not future.cancelled():
            self.give_back()  # granted, but cancelled before it could run: pass it on
        # else: _grant finds the future cancelled and passes the slot on
