"""Retry delays for sync: exponential backoff with full jitter, no retry cap.

Attempt n (0-based) waits a uniform random time between ``base`` and
``min(cap, base * 2**n)``: 1 s, then up to 2 s, 4 s, ... up to 300 s, forever (design §8,
like Greengrass's "retried forever, at intervals of up to five minutes"). The jitter
spreads a fleet of devices that lost the same link, so they do not all return at once;
the floor of ``base`` keeps an unlucky draw from turning into a hot retry loop.

A ``Retry-After`` from the cloud is a floor on the next delay: the cloud said when it
wants to hear from us, and retrying earlier only adds load where it is already short.
"""

import random

from .. import defaults as D

DEFAULT_BASE_S = 1.0
DEFAULT_CAP_S = 300.0
# A Retry-After past this is taken as a mistake (or a date with a wrong clock): an hour
# still respects the cloud, while a day-long silence would look like a dead device.
MAX_RETRY_AFTER_S = 3600.0


class Backoff:
    """Delays for consecutive failures; ``reset()`` after a success."""

    def __init__(self, base=DEFAULT_BASE_S, cap=DEFAULT_CAP_S, rng=None, spread=1.0):
        if not 0 < base <= cap or not 0 < spread <= 1:
            raise ValueError("backoff needs 0 < base <= cap and 0 < spread <= 1, got "
                             "base=%r cap=%r spread=%r" % (base, cap, spread))
        self.base = float(base)
        self.cap = float(cap)
        self.rng = rng if rng is not None else random.Random()
        # 1.0 = full jitter (anywhere from base up to the ceiling); 0.5 = "equal jitter"
        # (the upper half), for checks that should keep close to their interval.
        self.spread = float(spread)
        self.failures = 0

    def ceiling(self):
        """The longest delay the next failure may draw."""
        # min() before the power would overflow on a device offline for months.
        exponent = min(self.failures, 64)
        return min(self.cap, self.base * (2.0 ** exponent))

    def next_delay(self, retry_after=None):
        """Seconds to wait after one more failure (``retry_after`` from the cloud, if any)."""
        ceiling = self.ceiling()
        delay = self.rng.uniform(max(self.base, ceiling * (1.0 - self.spread)), ceiling)
        self.failures += 1
        return max(delay, honoured_retry_after(retry_after))

    def max_out(self):
        """Jump to the cap: for failures that retrying soon cannot fix (a bad api_key)."""
        while self.ceiling() < self.cap:
            self.failures += 1
        return self.cap

    def reset(self):
        self.failures = 0


def honoured_retry_after(retry_after):
    """A Retry-After in seconds, bounded to something sane; 0 when there is none."""
    if retry_after is None:
        return 0.0
    return min(max(0.0, float(retry_after)), MAX_RETRY_AFTER_S)


def ping_backoff(ping_interval=D.DEFAULT_PING_INTERVAL, rng=None):
    """Pings while the link is down: 1 s first (a blip heals fast), growing to
    ``ping_interval``, jittered in the upper half so a long outage costs about one ping
    per interval, and a fleet that lost the same link does not return in lockstep."""
    return Backoff(base=min(DEFAULT_BASE_S, ping_interval), cap=ping_interval, rng=rng,
                   spread=0.5)
