"""What the pipeline tests share: the `Serving` their results attest, and their settings."""

from pathlib import Path
from typing import Any

from tests.support.settings import make_settings
from worker.core.settings import Settings
from worker.jobs.pipeline import Serving

SERVING = Serving("demo", "1", "a" * 64, "sha256:" + "1" * 64, 7)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for one pipeline on a node homed in `tmp_path`: short leases, 16 KiB jobs."""
    values: dict[str, Any] = {
        "ack_wait_s": 5.0,
        "max_deliver": 3,
        "max_job_bytes": 16 * 1024,
        "shutdown_grace_s": 5.0,
    }
    return make_settings(tmp_path, **(values | overrides))
