"""`resultity-node doctor` on this CPU-only machine (real Docker, a real hardened runtime
container), and its GPU findings on a double of the driver's inventory (no GPU needed)."""

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.support.fake_runtime_image import echo_image
from worker.core.settings import Settings
from worker.runtime.doctor import Finding, Status, examine
from worker.runtime.hardware import Gpu

pytestmark = pytest.mark.docker


def test_doctor_on_a_cpu_machine_says_so_and_checks_the_rest(docker_client: Any) -> None:
    echo_image(docker_client)  # built once for every test that needs it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "CPU-only node" in out
    assert "execution class: cpu-fp32" in out
    for check in ("docker", "hardened container", "runtime container", "jit cache"):
        assert f"ok    {check}:" in out, out
    assert "from /tmp it is refused" in out
    assert "no problem found" in out


class Inventory:
    def __init__(self, gpus: list[Gpu] | None) -> None:
        self._gpus = gpus

    def gpus(self) -> list[Gpu] | None:
        return self._gpus


H200 = Gpu(0, "GPU-11111111-aaaa", "NVIDIA H200", 140 << 30, 2 << 30, (9, 0), "570.86")


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def test_gpu_problems_are_named_with_their_fix(docker_client: Any) -> None:
    """GPUs 0 and a UUID the driver does not list; GPU 0 mostly taken; no toolkit on this
    Docker engine, so the hardened container cannot be given GPUs."""
    settings = Settings(gpus="0,GPU-99999999-zzzz", runtime_gpu_memory_utilization=0.9)
    findings = by_check(
        examine(
            settings,
            image=echo_image(docker_client),
            client=docker_client,
            inventory=Inventory([H200]),
        )
    )
    assert findings["nvidia driver"].status is Status.OK
    chosen = findings["chosen gpus"]
    assert chosen.status is Status.FAIL and "GPU-99999999-zzzz" in chosen.detail
    assert "nvidia-smi -L" in chosen.fix
    assert findings["execution class"].detail.startswith("nvidia-hopper-bf16")
    toolkit = findings["container toolkit"]
    assert toolkit.status is Status.FAIL and "nvidia-ctk runtime configure" in toolkit.fix
    assert findings["hardened container"].status is Status.OK  # the request itself is right
    assert findings["runtime container"].status is Status.FAIL
    memory = findings["gpu 0 memory"]
    assert memory.status is Status.FAIL and "2.0 GiB free" in memory.detail
    assert "RESULTITY_RUNTIME_GPU_MEMORY_UTILIZATION" in memory.fix


def test_a_configured_gpu_without_a_driver_is_a_problem() -> None:
    findings = by_check(
        examine(Settings(gpus="all"), image=None, client=None, inventory=Inventory(None))
    )
    driver = findings["nvidia driver"]
    assert driver.status is Status.FAIL and "install the NVIDIA driver" in driver.fix
    assert findings["execution class"].detail.startswith("nvidia-unknown-bf16")
    assert findings["docker"].status is Status.FAIL


def test_gpus_present_but_not_chosen_are_pointed_out() -> None:
    findings = by_check(examine(Settings(), image=None, client=None, inventory=Inventory([H200])))
    assert findings["gpus"].status is Status.INFO and "RESULTITY_GPUS=all" in findings["gpus"].fix
    assert findings["execution class"].detail.startswith("cpu-fp32")
