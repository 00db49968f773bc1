"""`check_isolation` alone, on inspect-shaped dicts: every weakening is named, fail closed.

The Docker tests (`test_container.py`) show that a real container created from
`create_kwargs` passes; these show that each setting the check covers is really checked.
"""

import copy
from pathlib import Path
from typing import Any

import pytest

from worker.core.errors import IsolationError
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.container import (
    MODEL_MOUNT,
    check_isolation,
    create_kwargs,
    expected_env,
    runtime_ulimits,
)

SETTINGS = Settings(runtime_memory="256m", runtime_shm="16m", runtime_pids=64, runtime_cpus=2)
SPEC = LaunchSpec("echo", "sha256:" + "1" * 64, Path("/models/m"), "cd" * 32, {})
IMAGE_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]


def env_list(env: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


def good() -> dict[str, Any]:
    env = expected_env(SPEC, SETTINGS, extra_env={})
    return {
        "Id": "f" * 64,
        "AppArmorProfile": "docker-default",
        "Config": {
            "User": SETTINGS.runtime_user,
            "Tty": False,
            "Env": IMAGE_ENV + env_list(env),
        },
        "HostConfig": {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "Privileged": False,
            "CapDrop": ["ALL"],
            "CapAdd": None,
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": 64,
            "Memory": 256 << 20,
            "MemorySwap": 256 << 20,
            "ShmSize": 16 << 20,
            "OomKillDisable": False,
            "NanoCpus": 2_000_000_000,
            "Ulimits": [
                {"Name": u.name, "Soft": u.soft, "Hard": u.hard} for u in runtime_ulimits(SETTINGS)
            ],
            "PidMode": "",
            "IpcMode": "private",
            "UTSMode": "",
            "UsernsMode": "",
            "CgroupnsMode": "private",
            "Devices": [],
            "Binds": None,
            "VolumesFrom": None,
            "Mounts": [{"Type": "bind", "Target": MODEL_MOUNT, "ReadOnly": True}],
            "Tmpfs": {"/tmp": "rw,noexec,nosuid,nodev,size=64m"},
            "DeviceRequests": None,
        },
        "Mounts": [
            {"Type": "bind", "Destination": MODEL_MOUNT, "RW": False, "Source": "/models/m"}
        ],
    }


def check(attrs: dict[str, Any]) -> None:
    check_isolation(
        attrs,
        SETTINGS,
        expected_env=expected_env(SPEC, SETTINGS, extra_env={}),
        image_env=IMAGE_ENV,
    )


def test_a_hardened_container_passes() -> None:
    check(good())


def test_create_kwargs_ask_for_what_the_check_wants() -> None:
    kwargs = create_kwargs(SPEC, SETTINGS, node_id="n", name="x", command=None, extra_env={})
    assert kwargs["nano_cpus"] == 2_000_000_000
    assert kwargs["memswap_limit"] == kwargs["mem_limit"]
    assert kwargs["oom_kill_disable"] is False
    assert {u.name: (u.soft, u.hard) for u in kwargs["ulimits"]} == {
        "nofile": (4096, 4096),
        "nproc": (64, 64),
        "core": (0, 0),
    }
    assert "seccomp=unconfined" not in kwargs["security_opt"]


def weakened(path: str, value: Any) -> dict[str, Any]:
    attrs = copy.deepcopy(good())
    *parents, last = path.split(".")
    node = attrs
    for part in parents:
        node = node[part]
    node[last] = value
    return attrs


WEAKENINGS = [
    ("HostConfig.SecurityOpt", ["no-new-privileges", "seccomp=unconfined"], "seccomp"),
    ("HostConfig.SecurityOpt", ["no-new-privileges", "seccomp:unconfined"], "seccomp"),
    ("HostConfig.SecurityOpt", ["no-new-privileges", "apparmor=unconfined"], "AppArmor"),
    ("AppArmorProfile", "unconfined", "AppArmor"),
    ("HostConfig.SecurityOpt", ["no-new-privileges:false"], "no-new-privileges"),
    ("HostConfig.Tmpfs", {"/tmp": "rw,exec,nosuid,nodev,size=64m"}, "/tmp"),
    ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,nosuid,nodev,size=64m,exec"}, "/tmp"),
    ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,suid,nodev,size=64m"}, "/tmp"),
    ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,nosuid,size=64m"}, "/tmp"),
    ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,nosuid,nodev"}, "/tmp"),
    ("HostConfig.MemorySwap", -1, "swap"),
    ("HostConfig.MemorySwap", 512 << 20, "swap"),
    ("HostConfig.ShmSize", 1 << 40, "shm"),
    ("HostConfig.OomKillDisable", True, "OOM"),
    ("HostConfig.NanoCpus", 0, "CPU"),
    ("HostConfig.NanoCpus", 64_000_000_000, "CPU"),
    ("HostConfig.Ulimits", None, "ulimit"),
    ("HostConfig.Ulimits", [{"Name": "core", "Soft": 0, "Hard": -1}], "ulimit"),
    (
        "Mounts",
        [
            {"Type": "bind", "Destination": MODEL_MOUNT, "RW": False},
            {"Type": "volume", "Destination": "/data", "RW": True},
        ],
        "/data",
    ),
    ("Mounts", [{"Type": "bind", "Destination": MODEL_MOUNT, "RW": True}], "writable"),
    ("Config.Env", [*good()["Config"]["Env"], "LD_PRELOAD=/tmp/x.so"], "LD_PRELOAD"),
    (
        "Config.Env",
        [e for e in good()["Config"]["Env"] if not e.startswith("RESULTITY_MODEL_SHA256=")]
        + ["RESULTITY_MODEL_SHA256=" + "0" * 64],
        "RESULTITY_MODEL_SHA256",
    ),
]


@pytest.mark.parametrize(("path", "value", "named"), WEAKENINGS, ids=lambda v: str(v)[:40])
def test_each_weakening_is_refused_and_named(path: str, value: Any, named: str) -> None:
    with pytest.raises(IsolationError, match="not isolated") as caught:
        check(weakened(path, value))
    assert named in str(caught.value)
