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
    DOCKER_MASKED_PATHS,
    DOCKER_READONLY_PATHS,
    MODEL_MOUNT,
    check_isolation,
    create_kwargs,
    expected_env,
    runtime_ulimits,
)

SETTINGS = Settings(runtime_memory="256m", runtime_shm="16m", runtime_pids=64, runtime_cpus=2)
SPEC = LaunchSpec("echo", "sha256:" + "1" * 64, Path("/models/m"), "cd" * 32, {})
JIT = "rw,exec,nosuid,nodev,size=2g,mode=0700,uid=65534,gid=65534"
IMAGE_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]


def env_list(env: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


def host_config() -> dict[str, Any]:
    """What Docker 20.10 reports for a container made from `create_kwargs` (inspected)."""
    return {
        "AutoRemove": False,
        "Binds": None,
        "BlkioDeviceReadBps": None,
        "BlkioDeviceReadIOps": None,
        "BlkioDeviceWriteBps": None,
        "BlkioDeviceWriteIOps": None,
        "BlkioWeight": 0,
        "BlkioWeightDevice": None,
        "CapAdd": None,
        "CapDrop": ["ALL"],
        "Cgroup": "",
        "CgroupParent": "",
        "CgroupnsMode": "private",
        "ConsoleSize": [0, 0],
        "ContainerIDFile": "",
        "CpuCount": 0,
        "CpuPercent": 0,
        "CpuPeriod": 0,
        "CpuQuota": 0,
        "CpuRealtimePeriod": 0,
        "CpuRealtimeRuntime": 0,
        "CpuShares": 0,
        "CpusetCpus": "",
        "CpusetMems": "",
        "DeviceCgroupRules": None,
        "DeviceRequests": None,
        "Devices": None,
        "Dns": None,
        "DnsOptions": None,
        "DnsSearch": None,
        "ExtraHosts": None,
        "GroupAdd": None,
        "IOMaximumBandwidth": 0,
        "IOMaximumIOps": 0,
        "IpcMode": "private",
        "Isolation": "",
        "KernelMemory": 0,
        "KernelMemoryTCP": 0,
        "Links": None,
        "LogConfig": {"Config": {"max-file": "1", "max-size": "10m"}, "Type": "json-file"},
        "MaskedPaths": list(DOCKER_MASKED_PATHS),
        "Memory": 256 << 20,
        "MemoryReservation": 0,
        "MemorySwap": 256 << 20,
        "MemorySwappiness": None,
        "Mounts": [
            {"ReadOnly": True, "Source": str(SPEC.model_dir), "Target": MODEL_MOUNT, "Type": "bind"}
        ],
        "NanoCpus": 2_000_000_000,
        "NetworkMode": "none",
        "OomKillDisable": False,
        "OomScoreAdj": 0,
        "PidMode": "",
        "PidsLimit": 64,
        "PortBindings": None,
        "Privileged": False,
        "PublishAllPorts": False,
        "ReadonlyPaths": list(DOCKER_READONLY_PATHS),
        "ReadonlyRootfs": True,
        "RestartPolicy": {"MaximumRetryCount": 0, "Name": ""},
        "Runtime": "runc",
        "SecurityOpt": ["no-new-privileges"],
        "ShmSize": 16 << 20,
        "Tmpfs": {"/tmp": "rw,noexec,nosuid,nodev,size=64m", "/jit": JIT},
        "UTSMode": "",
        "Ulimits": [
            {"Name": u.name, "Soft": u.soft, "Hard": u.hard} for u in runtime_ulimits(SETTINGS)
        ],
        "UsernsMode": "",
        "VolumeDriver": "",
        "VolumesFrom": None,
    }


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
        "HostConfig": host_config(),
        "Mounts": [
            {"Type": "bind", "Destination": MODEL_MOUNT, "RW": False, "Source": "/models/m"}
        ],
    }


def check(attrs: dict[str, Any]) -> None:
    check_isolation(
        attrs,
        SETTINGS,
        spec=SPEC,
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
    ("HostConfig.SecurityOpt", ["no-new-privileges", "seccomp=unconfined"], "SecurityOpt"),
    ("HostConfig.SecurityOpt", ["no-new-privileges", "seccomp:unconfined"], "SecurityOpt"),
    ("HostConfig.SecurityOpt", ["no-new-privileges", "apparmor=unconfined"], "SecurityOpt"),
    ("HostConfig.SecurityOpt", ["no-new-privileges", "label=disable"], "SecurityOpt"),
    ("AppArmorProfile", "unconfined", "AppArmor"),
    ("HostConfig.SecurityOpt", ["no-new-privileges:false"], "SecurityOpt"),
    *(
        ("HostConfig.Tmpfs", {"/tmp": tmp, "/jit": JIT}, "Tmpfs")
        for tmp in [
            "rw,exec,nosuid,nodev,size=64m",
            "rw,noexec,nosuid,nodev,size=64m,exec",
            "rw,noexec,suid,nodev,size=64m",
            "rw,noexec,nosuid,size=64m",
            "rw,noexec,nosuid,nodev",
        ]
    ),
    *(
        ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,nosuid,nodev,size=64m", "/jit": jit}, "Tmpfs")
        for jit in [
            JIT + ",suid",
            JIT.replace("nodev", "dev"),
            JIT.replace("size=2g", "size=200g"),
            JIT.replace(",uid=65534,gid=65534", ""),
            JIT.replace("mode=0700", "mode=1777"),
        ]
    ),
    ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,nosuid,nodev,size=64m"}, "Tmpfs"),
    ("HostConfig.Tmpfs", {"/tmp": "rw,noexec,nosuid,nodev,size=64m", "/run": JIT}, "Tmpfs"),
    ("HostConfig.MemorySwap", -1, "MemorySwap"),
    ("HostConfig.MemorySwap", 512 << 20, "MemorySwap"),
    ("HostConfig.ShmSize", 1 << 40, "ShmSize"),
    ("HostConfig.OomKillDisable", True, "OomKillDisable"),
    ("HostConfig.NanoCpus", 0, "NanoCpus"),
    ("HostConfig.NanoCpus", 64_000_000_000, "NanoCpus"),
    ("HostConfig.Ulimits", None, "Ulimits"),
    ("HostConfig.Ulimits", [{"Name": "core", "Soft": 0, "Hard": -1}], "Ulimits"),
    # The weakenings the deny-list let through (issue 20 item 9).
    ("HostConfig.PidMode", "container:" + "a" * 64, "PidMode"),
    ("HostConfig.PidMode", "host", "PidMode"),
    ("HostConfig.IpcMode", "container:" + "a" * 64, "IpcMode"),
    ("HostConfig.UTSMode", "host", "UTSMode"),
    ("HostConfig.UsernsMode", "host", "UsernsMode"),
    ("HostConfig.NetworkMode", "container:" + "a" * 64, "NetworkMode"),
    ("HostConfig.MaskedPaths", [], "MaskedPaths"),  # systempaths=unconfined
    ("HostConfig.ReadonlyPaths", [], "ReadonlyPaths"),  # systempaths=unconfined
    ("HostConfig.MaskedPaths", ["/proc/kcore"], "MaskedPaths"),
    ("HostConfig.GroupAdd", ["0"], "GroupAdd"),
    ("HostConfig.GroupAdd", ["docker"], "GroupAdd"),
    ("HostConfig.DeviceCgroupRules", ["c *:* rmw"], "DeviceCgroupRules"),
    ("HostConfig.PidsLimit", 10**9, "PidsLimit"),
    ("HostConfig.PidsLimit", 0, "PidsLimit"),
    ("HostConfig.PidsLimit", -1, "PidsLimit"),
    ("HostConfig.Memory", 0, "Memory"),
    ("HostConfig.Privileged", True, "Privileged"),
    ("HostConfig.ReadonlyRootfs", False, "ReadonlyRootfs"),
    ("HostConfig.CapAdd", ["SYS_ADMIN"], "CapAdd"),
    ("HostConfig.CapDrop", ["NET_RAW"], "CapDrop"),
    ("HostConfig.Devices", [{"PathOnHost": "/dev/mem"}], "Devices"),
    ("HostConfig.Binds", ["/:/host"], "Binds"),
    ("HostConfig.VolumesFrom", ["other"], "VolumesFrom"),
    ("HostConfig.DeviceRequests", [{"Count": -1, "Capabilities": [["gpu"]]}], "DeviceRequests"),
    ("HostConfig.OomScoreAdj", -1000, "OomScoreAdj"),
    ("HostConfig.CgroupParent", "/", "CgroupParent"),
    ("HostConfig.Runtime", "runsc-debug", "Runtime"),
    ("HostConfig.Cgroup", "host", "Cgroup"),
    ("HostConfig.ExtraHosts", ["nats:10.0.0.1"], "ExtraHosts"),
    ("HostConfig.RestartPolicy", {"Name": "always", "MaximumRetryCount": 0}, "RestartPolicy"),
    ("HostConfig.Mounts", [], "Mounts"),
    (
        "HostConfig.Mounts",
        [{"ReadOnly": False, "Source": "/models/m", "Target": MODEL_MOUNT, "Type": "bind"}],
        "Mounts",
    ),
    # A field this code has never heard of (a future Docker's): refused unless empty.
    ("HostConfig.SomeFutureKnob", "unconfined", "SomeFutureKnob"),
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


def test_a_field_docker_adds_in_its_empty_form_is_accepted() -> None:
    attrs = good()
    attrs["HostConfig"] |= {"Annotations": None, "SomeFutureList": [], "SomeFutureFlag": False}
    check(attrs)


def test_docker_spellings_of_none_are_one() -> None:
    attrs = good()
    attrs["HostConfig"] |= {"Devices": [], "CapAdd": [], "Binds": []}
    check(attrs)
    del attrs["HostConfig"]["GroupAdd"]
    check(attrs)


def test_every_problem_is_named_at_once() -> None:
    attrs = weakened("HostConfig.GroupAdd", ["0"])
    attrs["HostConfig"]["PidsLimit"] = 10**9
    with pytest.raises(IsolationError) as caught:
        check(attrs)
    assert "GroupAdd" in str(caught.value) and "PidsLimit" in str(caught.value)


GPU_REQUEST = {"Driver": "", "Count": 0, "Capabilities": [["gpu"]], "Options": {}}


@pytest.mark.parametrize(
    ("gpus", "request_", "ok"),
    [
        ("all", {**GPU_REQUEST, "Count": -1, "DeviceIDs": []}, True),
        ("0,1", {**GPU_REQUEST, "DeviceIDs": ["0", "1"]}, True),
        ("0,1", {**GPU_REQUEST, "DeviceIDs": ["0"]}, False),
        ("0,1", {**GPU_REQUEST, "DeviceIDs": ["1", "0"]}, False),
        ("0", {**GPU_REQUEST, "Count": -1, "DeviceIDs": []}, False),
        ("all", {**GPU_REQUEST, "DeviceIDs": ["0"]}, False),
        ("GPU-aaaaaaaa-1111", {**GPU_REQUEST, "DeviceIDs": ["GPU-aaaaaaaa-2222"]}, False),
        ("0", {**GPU_REQUEST, "DeviceIDs": ["0"], "Options": {"x": "y"}}, False),
        ("0", {**GPU_REQUEST, "DeviceIDs": ["0"], "Capabilities": [["gpu", "display"]]}, False),
        ("", {**GPU_REQUEST, "DeviceIDs": ["0"]}, False),
    ],
)
def test_gpus_passed_are_exactly_the_chosen_ones(gpus: str, request_: Any, ok: bool) -> None:
    settings = SETTINGS.model_copy(update={"gpus": Settings(gpus=gpus).gpus})
    attrs = good()
    attrs["HostConfig"]["DeviceRequests"] = [request_]
    attrs["Config"]["Env"] = IMAGE_ENV + env_list(expected_env(SPEC, settings, extra_env={}))
    check_gpus = lambda: check_isolation(  # noqa: E731
        attrs,
        settings,
        spec=SPEC,
        expected_env=expected_env(SPEC, settings, extra_env={}),
        image_env=IMAGE_ENV,
    )
    if ok:
        check_gpus()
    else:
        with pytest.raises(IsolationError, match="DeviceRequests"):
            check_gpus()


@pytest.mark.parametrize(
    ("value", "canonical", "ids"),
    [
        ("", "", None),
        ("false", "", None),
        ("true", "all", ()),
        ("ALL", "all", ()),
        (" 0, 1 ", "0,1", ("0", "1")),
        ("GPU-0a1b2c3d-4e5f", "GPU-0a1b2c3d-4e5f", ("GPU-0a1b2c3d-4e5f",)),
    ],
)
def test_gpu_setting_forms(value: str, canonical: str, ids: Any) -> None:
    settings = Settings(gpus=value)
    assert settings.gpus == canonical
    assert settings.gpu_ids() == ids


@pytest.mark.parametrize("value", ["0,0", "gpu0", "GPU-x", "0;1"])
def test_gpu_setting_refuses_what_names_no_gpu(value: str) -> None:
    with pytest.raises(ValueError, match="GPU"):
        Settings(gpus=value)
