"""The Docker backend: hardening seen from inside the container, fail-closed inspection,
leftover removal, and no container left behind when cancelled at any await point."""

import asyncio
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

import worker.runtime.container
from tests.support.fake_runtime_image import echo_image
from tests.support.polling import wait_for
from tests.support.settings import MODEL_SHA, NODE_ID, make_settings
from worker.core.errors import IsolationError, RuntimeBroken
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.container import (
    LABEL_NODE,
    LABEL_ROLE,
    ROLE_RUNTIME,
    DockerBackend,
    StreamDemux,
)
from worker.runtime.supervisor import Supervisor
from worker.runtime.transport import call_blocking

pytestmark = pytest.mark.docker

PROBE = r"""
import json, os
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff:")][0].split()[1]
try:
    open("/rootfs-write-test", "w").close(); root_writable = True
except OSError:
    root_writable = False
try:
    open("/model/x", "w").close(); model_writable = True
except OSError:
    model_writable = False
env1 = open("/proc/1/environ", "rb").read().split(b"\0")
print(json.dumps({
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "cap_eff": int(caps, 16), "uid": os.getuid(), "gid": os.getgid(),
    "root_writable": root_writable, "model_writable": model_writable,
    "key_visible": os.path.exists(KEY),
    "agent_env": sorted(e.decode().split("=")[0] for e in env1 if e.startswith(b"RESULTITY_")),
}))
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.bin").write_bytes(b"m" * 1000)
    (model / "model.bin").chmod(0o644)
    model.chmod(0o755)
    return model


@pytest.fixture
def spec(docker_client: Any, model_dir: Path) -> LaunchSpec:
    return LaunchSpec(
        engine="echo",
        image=echo_image(docker_client),
        model_dir=model_dir,
        model_sha256=MODEL_SHA,
        engine_args={},
    )


def ours(client: Any) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={NODE_ID}"}))


def runtime_logged(client: Any, text: str) -> bool:
    """Whether one of our runtime containers wrote `text` to its stderr log."""
    return any(text.encode() in c.logs(stdout=False, stderr=True) for c in ours(client))


@pytest.fixture(autouse=True)
def no_leftovers(docker_client: Any) -> Any:
    for container in ours(docker_client):
        container.remove(force=True)
    yield
    assert ours(docker_client) == []


async def test_isolation_seen_from_inside(
    docker_client: Any, spec: LaunchSpec, tmp_path: Path
) -> None:
    key_file = tmp_path / "node.key"
    key_file.write_bytes(b"\0" * 32)
    settings = make_settings(fast_runtime=True, key_file=key_file, nats_url="nats://10.0.0.1:4222")
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)
    async with Supervisor(settings, backend, spec) as sup:
        ident = sup.stats().runtime_id
        container = docker_client.containers.get(ident)
        probe = PROBE.replace("KEY", repr(str(key_file)))
        code, output = await asyncio.to_thread(container.exec_run, ["python3", "-c", probe])
        assert code == 0, output
        facts = json.loads(output)
        assert facts["interfaces"] == ["lo"]
        assert facts["cap_eff"] == 0
        assert facts["uid"] != 0 and facts["gid"] != 0
        assert not facts["root_writable"] and not facts["model_writable"]
        assert not facts["key_visible"]
        assert "RESULTITY_KEY_FILE" not in facts["agent_env"]
        assert "RESULTITY_NATS_URL" not in facts["agent_env"]
        assert facts["agent_env"] == sorted(
            [
                "RESULTITY_ENGINE",
                "RESULTITY_ENGINE_ARGS",
                "RESULTITY_JIT_CACHE",
                "RESULTITY_MAX_FRAME_BYTES",
                "RESULTITY_MODEL_DIR",
                "RESULTITY_MODEL_SHA256",
            ]
        )
        assert container.labels[LABEL_ROLE] == ROLE_RUNTIME
        out = await sup.run([WorkItem(job_id="j", request={"prompt": "hi", "params": {}})])
        assert isinstance(out[0], Completion)


@pytest.mark.parametrize(
    "weaken",
    [
        {"read_only": False},
        {"cap_drop": None},
        {"network_mode": "bridge", "network_disabled": False},
        {"security_opt": None},
        {"user": "0:0"},
        {"privileged": True},
        {"pids_limit": None},
        {"security_opt": ["no-new-privileges", "seccomp=unconfined"]},
        {"tmpfs": {"/tmp": "rw,exec,nosuid,nodev,size=64m"}},
        {"tmpfs": {"/tmp": "rw,noexec,nosuid,nodev,size=64m"}},
        {"tmpfs": {"/tmp": "rw,exec,nosuid,nodev,size=64m", "/jit": "rw,exec,size=64m"}},
        {"memswap_limit": -1},
        {"pids_limit": 10**9},
        {"group_add": ["0"]},
        {"device_cgroup_rules": ["c 1:3 rwm"]},
        {"oom_score_adj": -999},
        {"shm_size": "1g"},
        {"nano_cpus": None},
        {"ulimits": None},
        {"environment": {"LD_PRELOAD": "/tmp/x.so"}},
    ],
    ids=lambda w: ",".join(w),
)
async def test_isolation_check_fails_closed(
    docker_client: Any, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, weaken: dict[str, Any]
) -> None:
    original = worker.runtime.container.create_kwargs

    def weakened(*args: Any, **kwargs: Any) -> dict[str, Any]:
        created = original(*args, **kwargs)
        for key, value in weaken.items():
            if value is None:
                created.pop(key, None)
            elif key == "environment":
                created[key] = created[key] | value
            else:
                created[key] = value
        return created

    monkeypatch.setattr(worker.runtime.container, "create_kwargs", weakened)
    settings = make_settings(fast_runtime=True)
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)
    with pytest.raises(IsolationError, match="not isolated"):
        async with Supervisor(settings, backend, spec):
            pass


async def test_image_declared_volume_fails_closed(docker_client: Any, spec: LaunchSpec) -> None:
    """A `VOLUME` in the image adds a writable mount seen only in the inspection's `Mounts`."""
    image = await asyncio.to_thread(volume_image, docker_client, spec.image)
    settings = make_settings()
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)
    with pytest.raises(IsolationError, match="unexpected mount /data"):
        async with Supervisor(settings, backend, dataclasses.replace(spec, image=image)):
            pass


def volume_image(client: Any, base: str) -> str:
    dockerfile = f"FROM {base}\nVOLUME /data\n".encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    context.seek(0)
    tag = f"rst-test-volume:{base.split(':')[-1][:16]}"
    image, _ = client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    return str(image.id)


async def test_leftovers_removed_at_start(docker_client: Any, spec: LaunchSpec) -> None:
    stale = docker_client.containers.create(
        spec.image, labels={LABEL_NODE: NODE_ID, LABEL_ROLE: ROLE_RUNTIME}, network_mode="none"
    )
    settings = make_settings(fast_runtime=True)
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)
    async with Supervisor(settings, backend, spec) as sup:
        assert [c.id for c in ours(docker_client)] == [sup.stats().runtime_id]
    assert stale.id not in [c.id for c in docker_client.containers.list(all=True)]


async def test_cancel_at_each_docker_call(
    docker_client: Any, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel the task entering the supervisor right at its n-th Docker call, for every n
    until the supervisor opens without being cancelled."""
    settings = make_settings(fast_runtime=True)

    async def open_cancelled_at(n: int) -> bool:
        calls = 0
        task: asyncio.Task[None] | None = None

        async def cancelling(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == n and task is not None and asyncio.current_task() is task:
                task.cancel()
            return await call_blocking(fn, *args, **kwargs)

        monkeypatch.setattr(worker.runtime.container, "call_blocking", cancelling)
        backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)

        async def enter() -> None:
            async with Supervisor(settings, backend, spec):
                pass

        task = asyncio.ensure_future(enter())
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    n = 1
    while await open_cancelled_at(n):
        assert ours(docker_client) == [], f"container left after cancel at call {n}"
        n += 1
    assert n > 3  # create, attach and start were all hit


@pytest.mark.parametrize("phase", ["waiting_ready", "mid_request", "idle"])
async def test_cancel_outer_task_leaves_nothing(
    docker_client: Any, spec: LaunchSpec, phase: str
) -> None:
    settings = make_settings(
        fast_runtime=True, runtime_ready_timeout_s=30.0, request_timeout_s=30.0
    )
    env = {"RESULTITY_ECHO_FAULT": "noready"} if phase == "waiting_ready" else {}
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client, extra_env=env)
    if phase == "mid_request":
        spec = dataclasses.replace(spec, engine_args={"token_delay_ms": 20000})
    started = asyncio.Event()

    async def body() -> None:
        async with Supervisor(settings, backend, spec) as sup:
            started.set()
            if phase == "mid_request":
                await sup.run([WorkItem(job_id="j", request={"prompt": "slow", "params": {}})])
            await asyncio.Event().wait()  # idle until cancelled

    task = asyncio.ensure_future(body())
    if phase == "waiting_ready":
        await wait_for(lambda: asyncio.to_thread(runtime_logged, docker_client, "fault=noready"))
    elif phase == "mid_request":
        await wait_for(
            lambda: asyncio.to_thread(runtime_logged, docker_client, "echo_request_received")
        )
    else:
        await started.wait()  # the body is parked on its idle wait now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ours(docker_client) == []


def test_stream_demux_splits_and_rejoins() -> None:
    demux = StreamDemux()
    data = b"\x01\0\0\0\0\0\0\x03abc" + b"\x02\0\0\0\0\0\0\x02e\n" + b"\x01\0\0\0\0\0\0\x04wxyz"
    got = []
    for i in range(0, len(data), 5):
        got.extend(demux.feed(data[i : i + 5]))
    assert got == [(1, b"abc"), (2, b"e\n"), (1, b"wxyz")]
    assert demux.pending == 0
    with pytest.raises(RuntimeBroken):
        StreamDemux().feed(b"\x07\0\0\0\0\0\0\x01x")


@pytest.mark.parametrize(
    ("gpus", "created_with"),
    [
        ("all", "all"),
        ("0,GPU-12345678-abcd", "0,GPU-12345678-abcd"),
        ("0", "all"),
        ("0", "1"),
        ("all", "0"),
    ],
)
async def test_chosen_gpus_are_exactly_the_ones_requested(
    docker_client: Any, spec: LaunchSpec, gpus: str, created_with: str
) -> None:
    """RESULTITY_GPUS becomes the DeviceRequest, and the check on the real inspection accepts
    exactly that request. Created, never started: no GPU needed."""
    settings = make_settings(fast_runtime=True, gpus=gpus)
    asked = make_settings(fast_runtime=True, gpus=created_with)
    kwargs = worker.runtime.container.create_kwargs(
        spec, asked, node_id=NODE_ID, name=f"rst-gpu-{NODE_ID[:8]}", command=None, extra_env={}
    )
    container = await call_blocking(docker_client.containers.create, **kwargs)
    try:
        await call_blocking(container.reload)
        image_env = docker_client.api.inspect_image(spec.image)["Config"]["Env"]

        def check() -> None:
            worker.runtime.container.check_isolation(
                container.attrs,
                settings,
                spec=spec,
                expected_env=worker.runtime.container.expected_env(spec, settings, extra_env={}),
                image_env=image_env,
            )

        if gpus == created_with:
            check()
        else:
            with pytest.raises(IsolationError, match="DeviceRequests"):
                check()
    finally:
        await call_blocking(container.remove, force=True)
