"""Run slots shared by the event loop and other threads (fmedge.pipeline.slots)."""

import asyncio
import threading

from fmedge.pipeline.slots import RUN, WAIT, Slots
from polling import wait_until


def test_slots_are_taken_then_queued_then_refused():
    slots = Slots(2)
    assert [slots.admit(1) for _ in range(4)] == [RUN, RUN, WAIT, None]
    assert (slots.running, slots.queued) == (2, 1)
    slots.leave()                          # the queued one gave up before waiting
    assert slots.admit(1) == WAIT
    slots.leave()
    slots.give_back()
    assert (slots.running, slots.queued) == (1, 0) and slots.admit(0) == RUN


def test_a_slot_given_back_goes_to_the_first_waiter_in_its_loop():
    slots = Slots(1)
    order = []

    async def scenario():
        assert slots.admit(5) == RUN
        waiters = []
        for name in ("first", "second"):
            assert slots.admit(5) == WAIT
            waiters.append(asyncio.ensure_future(waiter(name)))
        await wait_until(lambda: len(slots._waiters) == 2)
        assert slots.admit(5) == WAIT       # a newcomer queues behind, never overtakes
        slots.leave()
        # Given back from another thread, as an HTTP worker's run does.
        thread = threading.Thread(target=slots.give_back)
        thread.start()
        thread.join()
        await wait_until(lambda: order == ["first"])
        slots.give_back()
        await asyncio.gather(*waiters)

    async def waiter(name):
        await slots.wait()
        order.append(name)

    asyncio.run(scenario())
    assert order == ["first", "second"]
    assert (slots.running, slots.queued) == (1, 0)


def test_a_cancelled_waiter_passes_its_slot_on_and_takes_none():
    slots = Slots(1)

    async def scenario():
        assert slots.admit(5) == RUN
        assert slots.admit(5) == WAIT
        cancelled = asyncio.ensure_future(slots.wait())
        assert slots.admit(5) == WAIT
        later = asyncio.ensure_future(slots.wait())
        await wait_until(lambda: len(slots._waiters) == 2)
        slots.give_back()                   # on its way to the first waiter ...
        cancelled.cancel()                  # ... which is cancelled before it arrives
        await later                         # so the second one gets it
        assert cancelled.cancelled()
        assert (slots.running, slots.queued) == (1, 0)
        slots.give_back()

    asyncio.run(scenario())
    assert (slots.running, slots.queued) == (0, 0) and slots.admit(0) == RUN


def test_many_threads_never_exceed_the_slots():
    slots = Slots(3)
    inside, peak, lock = [0], [0], threading.Lock()

    def worker():
        for _ in range(2000):
            if slots.admit(0) != RUN:
                continue
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            with lock:
                inside[0] -= 1
            slots.give_back()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= peak[0] <= 3
    assert (slots.running, slots.queued) == (0, 0)
