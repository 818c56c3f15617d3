"""A clock tests move by hand: stores take it instead of time.time."""


class FakeClock:
    def __init__(self, start=1_700_000_000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds=0.0, days=0.0):
        self.now += seconds + days * 86400.0
        return self.now
