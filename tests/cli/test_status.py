"""`resultity-node status` against a dev node: a summary a new user can read, and `--json`
for the raw reply."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.polling import wait_until
from worker.devtools.devhome import CLIENT_FILE, HOME_VARIABLE

pytestmark = [pytest.mark.nats, pytest.mark.timeout(300)]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    env[HOME_VARIABLE] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_of_a_dev_node(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    log = (tmp_path / "dev.out").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    dev = subprocess.Popen(
        [sys.executable, "-m", "worker.cli.main", "dev", "--port", "0", "--home", str(home)]
        + ["--engine", "echo", "--backend", "process", "--no-gateway", "--metrics-port", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def serving() -> dict[str, Any] | None:
            if dev.poll() is not None:
                raise AssertionError((tmp_path / "dev.out").read_text())
            if not (home / CLIENT_FILE).exists():
                return None
            answer = cli(home, "status", "--json")
            if answer.returncode != 0:
                return None
            reply: dict[str, Any] = json.loads(answer.stdout)
            ready = reply["state"] == "serving" and reply["last_heartbeat_at"] is not None
            return reply if ready else None

        raw = wait_until(serving, timeout=240)
        shown = cli(home, "status")
    finally:
        dev.send_signal(signal.SIGINT)
        dev.wait(120)
        log.close()
    assert raw["models"][0]["state"] == "active" and raw["hardware"]["gpus"] == []
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    lines = {line.split()[0]: line for line in text.splitlines() if line[:1].strip()}
    assert lines["node"].split()[1] == raw["node_id"]
    assert lines["state"].startswith("state     serving, up ")
    assert lines["heartbeat"].endswith(" ago")
    version = raw["config_version"]
    assert lines["config"] == (
        f"config    snapshot version {version} (envelope sha256 {raw['config_hash'][:16]}...)"
    ), text
    model = raw["models"][0]
    assert f"{model['id']} {model['version']}" in lines["models"] and "active" in lines["models"]
    assert "engine echo " in text
    assert lines["runtime"].startswith("runtime   0 restarts, last ping ")
    assert lines["hardware"].split(None, 1)[1].endswith("cores")
    assert "no NVIDIA GPU seen" in text
    assert "Traceback" not in shown.stderr + text
