"""A runtime's stderr into the agent's log, bounded: the runtime runs untrusted-ish engine
code, and its stderr must not flood the log nor forge log events.

Lines are cut at `max_line` characters, control characters are escaped (a `\\r`, an ANSI
escape or a newline inside a line cannot fake another log line), and a token bucket lets
`burst` lines through at once and `per_second` after that; the lines it drops are counted
and the count is logged as soon as a line passes again, and at the end. Pure: no I/O.
"""

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_LOG_LINE = 4096


def escape(text: str) -> str:
    """`text` with every non-printable character as a Python escape (`\\x1b`, `\\r`, ...)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class RuntimeLog:
    """Feed it stderr bytes; it logs `runtime_log` events within its budget."""

    BURST = 200
    PER_SECOND = 20.0

    def __init__(
        self,
        ident: str,
        *,
        burst: int = BURST,
        per_second: float = PER_SECOND,
        max_line: int = MAX_LOG_LINE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ident = ident[:12]
        self._burst = float(burst)
        self._per_second = per_second
        self._max_line = max_line
        self._clock = clock
        self._tokens = float(burst)
        self._refilled = clock()
        self._pending = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        self._pending += data
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                if len(self._pending) > self._max_line:
                    self._line(bytes(self._pending[: self._max_line]))
                    del self._pending[: self._max_line]
                    continue
                return
            line = bytes(self._pending[:end])
            del self._pending[: end + 1]
            self._line(line)

    def flush(self) -> None:
        """Log what is left without a newline, and the count of dropped lines."""
        if self._pending:
            self._line(bytes(self._pending))
            self._pending.clear()
        self._report_dropped()

    def _line(self, raw: bytes) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._per_second)
        self._refilled = now
        if self._tokens < 1:
            self.dropped += 1
            return
        self._tokens -= 1
        self._report_dropped()
        text = escape(raw[: self._max_line].decode("utf-8", "replace").rstrip())
        if text:
            log.info("runtime_log runtime=%s line=%s", self._ident, text)

    def _report_dropped(self) -> None:
        if self.dropped:
            log.warning("runtime_log_dropped runtime=%s lines=%d", self._ident, self.dropped)
            self.dropped = 0
