"""Progress of a long transfer: a bar on a terminal, a log line every 10% otherwise."""

import logging
import sys
import time

log = logging.getLogger(__name__)


class ProgressReport:
    """Call with the bytes done so far; `what` names the event (`model_download`, ...)."""

    def __init__(self, total: int, what: str) -> None:
        self.total = max(total, 1)
        self.what = what
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.next_log = 0.1

    def __call__(self, done: int) -> None:
        frac = done / self.total
        rate = done / 1e6 / max(time.monotonic() - self.started, 1e-9)
        if self.tty:
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.what} [{bar:<30}] {frac:6.1%} {rate:8.1f} MB/s")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif frac >= self.next_log or done >= self.total:
            log.info(
                "%s_progress done=%d total=%d mb_per_s=%.1f", self.what, done, self.total, rate
            )
            self.next_log = frac + 0.1
