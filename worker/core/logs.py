"""Logging setup: events with key=value fields, to stderr; for `dev`, a quiet console.

`setup_logging` sends every event to stderr (the node and the ops commands). `quiet_console`
is for a person watching `dev`: the console then shows only the steps (events of the
`STEP_LOGGER` logger, one plain line each) and warnings, while every event goes to a log
file; with `verbose`, the console keeps streaming everything as well.
"""

import logging
import sys
from pathlib import Path

STEP_LOGGER = "resultity.step"
FORMAT = "%(asctime)s %(levelname)-5s %(name)s %(message)s"


def setup_logging(*, verbose: bool = False) -> None:
    root = logging.getLogger()
    if _console() is not None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    handler._resultity = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("docker", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # nats-py logs every failed connect attempt with a traceback from its default callback;
    # the agent and the commands report connection trouble themselves, in one line.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


def quiet_console(log_file: Path, *, verbose: bool = False) -> None:
    """Every event to `log_file` (one run's); the console keeps steps and warnings only,
    unless `verbose`."""
    setup_logging(verbose=verbose)
    root = logging.getLogger()
    if verbose:
        root.setLevel(logging.DEBUG)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(to_file)
    console = _console()
    if console is not None and not verbose:
        console.addFilter(_steps_and_warnings)
        console.setFormatter(_ConsoleFormatter(quiet=True))


def _console() -> logging.Handler | None:
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_resultity", False):
            return handler
    return None


def _steps_and_warnings(record: logging.LogRecord) -> bool:
    return record.name == STEP_LOGGER or record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """Steps as plain lines; other events timestamped, or (quiet) as indented warnings."""

    def __init__(self, *, quiet: bool = False) -> None:
        super().__init__(FORMAT)
        self.quiet = quiet

    def format(self, record: logging.LogRecord) -> str:
        if record.name == STEP_LOGGER:
            return record.getMessage()
        if self.quiet:
            return f"{'':9} {record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)
