"""`check_isolation` against `docker inspect` dicts, without Docker: a hardened container
passes, and each missing hardening setting is named (fail closed, also on absent keys)."""

import copy
from typing import Any

import pytest

from tests.support.settings import make_settings
from worker.core.errors import IsolationError
from worker.runtime.container import MODEL_MOUNT, check_isolation

DELETE = object()
SETTINGS = make_settings(runtime_memory="256m", runtime_user="65534:65534")


def hardened() -> dict[str, Any]:
    return {
        "Id": "0123456789abcdef",
        "Config": {"User": "65534:65534", "Tty": False},
        "HostConfig": {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "Privileged": False,
            "CapDrop": ["ALL"],
            "CapAdd": None,
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": 64,
            "Memory": 256 * 1024 * 1024,
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
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    attrs = copy.deepcopy(hardened())
    *parents, last = path.split(".")
    node = attrs
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return attrs


def test_a_hardened_container_passes() -> None:
    check_isolation(hardened(), SETTINGS)


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        ("HostConfig.NetworkMode", "bridge", "network mode is 'bridge'"),
        ("HostConfig.NetworkMode", DELETE, "network mode is None"),
        ("HostConfig.ReadonlyRootfs", False, "root filesystem is writable"),
        ("HostConfig.Privileged", True, "privileged"),
        ("HostConfig.Privileged", DELETE, "privileged"),
        ("HostConfig.CapDrop", ["NET_RAW"], "not all dropped"),
        ("HostConfig.CapAdd", ["SYS_ADMIN"], "capabilities added"),
        ("HostConfig.SecurityOpt", ["no-new-privileges:false"], "no-new-privileges"),
        ("HostConfig.SecurityOpt", None, "no-new-privileges"),
        ("Config.User", "0:0", "runs as root"),
        ("Config.User", "", "runs as root"),
        ("Config.User", "1000:1000", "not '65534:65534'"),
        ("HostConfig.PidsLimit", 0, "no pids limit"),
        ("HostConfig.PidsLimit", None, "no pids limit"),
        ("HostConfig.Memory", 0, "memory limit is 0"),
        ("HostConfig.PidMode", "host", "PidMode is host"),
        ("HostConfig.IpcMode", "host", "IpcMode is host"),
        ("HostConfig.UTSMode", "host", "UTSMode is host"),
        ("HostConfig.UsernsMode", "host", "UsernsMode is host"),
        ("HostConfig.CgroupnsMode", "host", "CgroupnsMode is host"),
        ("HostConfig.Devices", [{"PathOnHost": "/dev/kvm"}], "host devices"),
        ("HostConfig.Binds", ["/:/host"], "bind volumes"),
        ("HostConfig.VolumesFrom", ["other"], "volumes from"),
        ("HostConfig.Mounts", [{"Target": MODEL_MOUNT, "ReadOnly": False}], "is writable"),
        ("HostConfig.Mounts", [], "model is not mounted"),
        ("HostConfig.Tmpfs", {"/tmp": "", "/run": ""}, "unexpected tmpfs"),
        ("HostConfig.DeviceRequests", [{"Count": -1}], "GPUs passed"),
        ("Config.Tty", True, "has a tty"),
        ("Config.Tty", DELETE, "has a tty"),
    ],
)
def test_each_missing_hardening_is_named(path: str, value: Any, says: str) -> None:
    with pytest.raises(IsolationError, match="not isolated") as info:
        check_isolation(with_change(path, value), SETTINGS)
    assert says in str(info.value)
    assert "0123456789ab" in str(info.value)


def test_an_empty_inspection_fails_closed_and_lists_every_problem() -> None:
    with pytest.raises(IsolationError) as info:
        check_isolation({}, SETTINGS)
    assert str(info.value).count(";") >= 8


def test_gpus_pass_when_the_node_is_configured_for_them() -> None:
    check_isolation(
        with_change("HostConfig.DeviceRequests", [{"Count": -1}]),
        make_settings(runtime_memory="256m", gpus=True),
    )
