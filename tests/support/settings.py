"""The one Settings builder for tests, and the identities the runtime tests share."""

import secrets
from pathlib import Path
from typing import Any

from worker.core.settings import Settings
from worker.core.signing import write_key_file

NODE_ID = secrets.token_hex(32)
"""Per test run: runtime containers labelled with another run's node id are not ours."""
MODEL_SHA = "cd" * 32

FAST_RUNTIME: dict[str, Any] = {
    "runtime_ready_timeout_s": 15.0,
    "request_timeout_s": 30.0,
    "runtime_write_timeout_s": 2.0,
    "ping_interval_s": 1.0,
    "ping_timeout_s": 3.0,
    "runtime_stop_timeout_s": 1.0,
    "runtime_max_frame_bytes": 1 << 20,
    "runtime_memory": "256m",
    "runtime_pids": 64,
    "runtime_shm": "16m",
}
"""Short supervisor deadlines and small container limits, for tests that drive a runtime."""


def make_settings(
    home: Path | None = None, *, fast_runtime: bool = False, **overrides: Any
) -> Settings:
    """Settings with `overrides` on top of the defaults.

    With `home`, the node's files live there: a node key file (written once), and the
    cache and state directories. With `fast_runtime`, the `FAST_RUNTIME` deadlines.
    """
    # Tests that do not concern bus security run against a bare local nats-server, with no
    # node registry.
    values: dict[str, Any] = {"nats_insecure": True, "admission_required": False}
    if fast_runtime:
        values |= FAST_RUNTIME
    if home is not None:
        key_file = home / "node.key"
        if not key_file.exists():
            write_key_file(key_file)
        values |= {"key_file": key_file, "cache_dir": home / "cache", "state_dir": home / "state"}
    values |= overrides
    return Settings(**values)
