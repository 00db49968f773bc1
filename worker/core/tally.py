"""Log events that can come in floods, counted instead of written one line each.

The first event of a quiet spell is logged as it is; those that follow within `period_s`
are only counted, and one summary line per period says how many there were, until a
period passes with none. A flood of 100,000 costs a line or two, not 100,000.
"""

import asyncio
import logging


class Tally:
    """One event kind (`message` % args, lazily formatted), counted; `total` counts all."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        summary: str,
        *,
        period_s: float = 10.0,
        level: int = logging.INFO,
    ) -> None:
        self._log = logger
        self._message = message
        self._summary = summary
        self.period_s = period_s
        self._level = level
        self.total = 0
        self._unlogged = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def counting(self) -> bool:
        """Within a period after a logged event: the next one is counted, not logged."""
        return self._timer is not None

    def add(self, *args: object) -> None:
        self.total += 1
        if self._timer is None:  # quiet until now: this one is logged in full
            self._log.log(self._level, self._message, *args)
            self._timer = asyncio.get_running_loop().call_later(self.period_s, self._period_ended)
        else:
            self._unlogged += 1

    def close(self) -> None:
        """Log what is counted and not logged yet, now; stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write_summary()

    def _period_ended(self) -> None:
        self._timer = None
        if self._write_summary():  # still flooding: one more period of counting
            self._timer = asyncio.get_running_loop().call_later(self.period_s, self._period_ended)

    def _write_summary(self) -> bool:
        if not self._unlogged:
            return False
        self._log.log(
            self._level,
            "%s count=%d period_s=%g total=%d",
            self._summary,
            self._unlogged,
            self.period_s,
            self.total,
        )
        self._unlogged = 0
        return True
