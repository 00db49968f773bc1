"""Logging setup: events with key=value fields, to stderr."""

import logging
import sys


def setup_logging(*, verbose: bool = False) -> None:
    root = logging.getLogger()
    if any(getattr(h, "_resultity", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s %(message)s"))
    handler._resultity = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("docker", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # nats-py logs every failed connect attempt with a traceback from its default callback;
    # the agent and the commands report connection trouble themselves, in one line.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
