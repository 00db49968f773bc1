"""The README's first command, as a new user runs it: `resultity-node dev` prints a verified
signed result of a real inference (vLLM on the tiny model, in the hardened container)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.vllm]


@pytest.mark.timeout(1500)
def test_dev_prints_a_verified_signed_vllm_result(docker_client: object, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.main",
            "dev",
            "--once",
            "--port",
            "0",
            "--home",
            str(tmp_path / "dev"),
            "--prompt",
            "Hello from the quick start",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "=== verified signed result ===" in out
    assert "(Ed25519 signature verified)" in out
    assert "runtime    vllm " in out, out
    assert "model      tiny-llama" in out
    assert "(matches the bytes sent)" in out
