"""Progress for long work (model downloads, imports): a bar on a terminal, callbacks otherwise.

Long operations take a ``progress(done, total)`` callback and know nothing about
terminals. The CLI passes ``terminal_progress(label)``: a bar redrawn in place on stderr
when stderr is a terminal, and nothing at all otherwise, so logs, pipes and cron mail
never fill up with carriage returns.
"""

import sys
import time

BAR_WIDTH = 28
# Redraws per second at most: a fast loopback download reports thousands of chunks a
# second, and writing each one to the terminal would cost more than the download.
_MIN_REDRAW_S = 0.1


def human_bytes(count):
    """1536 -> '1.5 KB' (binary units, like the rest of the CLI)."""
    count = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024:
            return "%d B" % count if unit == "B" else "%.1f %s" % (count, unit)
        count /= 1024.0
    return "%.1f TB" % count


class ProgressBar:
    """``label [#####.....]  42%  1.2 GB / 2.9 GB  31.0 MB/s``, redrawn in place.

    Call it as ``bar(done, total)``; ``total`` may be None or 0 when unknown (then only
    the byte count and the speed show). A newline is written once ``done`` reaches
    ``total``, or by ``finish()``.
    """

    def __init__(self, label, stream=None, clock=time.monotonic):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._started = clock()
        self._last_draw = None
        self._finished = False

    def __call__(self, done, total=None):
        if self._finished:
            return
        complete = bool(total) and done >= total
        now = self._clock()
        if not complete and self._last_draw is not None and \
                now - self._last_draw < _MIN_REDRAW_S:
            return
        self._last_draw = now
        self._draw(done, total, now)
        if complete:
            self.finish()

    def finish(self):
        if not self._finished:
            self._finished = True
            if self._last_draw is not None:
                self.stream.write("\n")
                self.stream.flush()

    def _draw(self, done, total, now):
        elapsed = max(now - self._started, 1e-6)
        speed = "%s/s" % human_bytes(done / elapsed)
        if total:
            filled = int(BAR_WIDTH * min(done, total) / total)
            bar = "[%s%s] %3d%%" % ("#" * filled, "." * (BAR_WIDTH - filled),
                                     100 * min(done, total) // total)
            amount = "%s / %s" % (human_bytes(done), human_bytes(total))
        else:
            bar, amount = "", human_bytes(done)
        line = "%s %s  %s  %s" % (self.label, bar, amount, speed)
        # \r returns to the line start; the padding wipes a longer previous line.
        self.stream.write("\r" + line.ljust(79))
        self.stream.flush()


def terminal_progress(label, stream=None):
    """A ProgressBar when ``stream`` (stderr by default) is a terminal, else None."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        interactive = bool(isatty and isatty())
    except (OSError, ValueError):   # a closed stream
        interactive = False
    return ProgressBar(label, stream) if interactive else None
