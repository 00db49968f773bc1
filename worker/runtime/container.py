"""The Docker backend: one hardened, networkless runtime container per launch, frames over
the container's attach socket.

Every Docker SDK call runs in a worker thread (`call_blocking`). The container is created,
then inspected, and started only if the inspection shows every hardening setting in force
(`check_isolation`, fail closed). Its stdin/stdout/stderr are attached before it starts, so
no byte is lost; Docker multiplexes stdout and stderr on the socket (non-tty) behind 8-byte
headers that `StreamDemux` removes. The socket itself is driven by the event loop in
non-blocking mode, with no thread hop per read.
"""

import asyncio
import dataclasses
import logging
import math
import os
import socket
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit
from docker.utils import parse_bytes

from schemas import frames, runtime_env
from schemas.frames import Frame
from worker.core.errors import IsolationError, RuntimeBroken, RuntimeEnded, RuntimeStartError
from worker.core.resource import AsyncResource
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.launch import launch_env
from worker.runtime.stderrlog import RuntimeLog
from worker.runtime.transport import FrameInbox, FrameWriter, call_blocking

log = logging.getLogger(__name__)

LABEL_NODE = "resultity.node"
LABEL_ROLE = "resultity.role"
ROLE_RUNTIME = "runtime"
MODEL_MOUNT = "/model"
TMPFS_OPTIONS = "rw,noexec,nosuid,nodev,size=64m"
JIT_MOUNT = "/jit"
"""The compile cache: the runtime's one mount that allows exec (a JIT-compiled kernel is a
shared object the engine writes, then maps as code). Owned by the runtime user, sized
by `runtime_jit_cache`, no setuid, no devices; /tmp and everything else stay noexec."""
RUNTIME_NOFILE = 4096
READ_CHUNK = 1 << 16

STDOUT = 1
STDERR = 2


class StreamDemux:
    """Splits Docker's multiplexed attach stream: each chunk is an 8-byte header (stream
    type, 3 zero bytes, big-endian length) and the payload. Pure: no I/O."""

    _HEADER = struct.Struct(">BxxxI")

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        chunks: list[tuple[int, bytes]] = []
        while len(self._buffer) >= 8:
            stream, size = self._HEADER.unpack_from(self._buffer)
            if stream not in (0, STDOUT, STDERR) or self._buffer[1:4] != b"\0\0\0":
                raise RuntimeBroken(f"bad Docker stream header {bytes(self._buffer[:8]).hex()}")
            if len(self._buffer) < 8 + size:
                break
            chunks.append((stream, bytes(self._buffer[8 : 8 + size])))
            del self._buffer[: 8 + size]
        return chunks

    @property
    def pending(self) -> int:
        return len(self._buffer)


def expected_env(
    spec: LaunchSpec, settings: Settings, *, extra_env: Mapping[str, str]
) -> dict[str, str]:
    """The environment the agent gives a runtime container (added to the image's own)."""
    env = launch_env(spec, settings, model_dir=MODEL_MOUNT)
    return env | {runtime_env.JIT_CACHE: JIT_MOUNT} | dict(extra_env)


def jit_tmpfs_options(settings: Settings) -> str:
    """Mount options of `JIT_MOUNT`: exec, but nosuid and nodev, sized, the runtime's own."""
    options = f"rw,exec,nosuid,nodev,size={settings.runtime_jit_cache}"
    uid, _, gid = settings.runtime_user.partition(":")
    if uid.isdigit() and (gid or uid).isdigit():
        return f"{options},mode=0700,uid={uid},gid={gid or uid}"
    return f"{options},mode=1777"


def runtime_tmpfs(settings: Settings) -> dict[str, str]:
    """The runtime's writable mounts: /tmp (noexec) and the compile cache (exec)."""
    return {"/tmp": TMPFS_OPTIONS, JIT_MOUNT: jit_tmpfs_options(settings)}


def runtime_cpus(settings: Settings) -> float:
    """The runtime's CPU limit: the setting, or else every CPU of the host."""
    return settings.runtime_cpus or float(os.cpu_count() or 1)


def runtime_ulimits(settings: Settings) -> list[Ulimit]:
    """Open files bounded, processes bounded like the pids limit, no core dumps."""
    return [
        Ulimit(name="nofile", soft=RUNTIME_NOFILE, hard=RUNTIME_NOFILE),
        Ulimit(name="nproc", soft=settings.runtime_pids, hard=settings.runtime_pids),
        Ulimit(name="core", soft=0, hard=0),
    ]


def create_kwargs(
    spec: LaunchSpec,
    settings: Settings,
    *,
    node_id: str,
    name: str,
    command: Sequence[str] | None,
    extra_env: Mapping[str, str],
) -> dict[str, Any]:
    """Arguments of `containers.create` for a hardened runtime container."""
    env = expected_env(spec, settings, extra_env=extra_env)
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": name,
        "detach": True,
        "stdin_open": True,
        "tty": False,
        "network_mode": "none",
        "network_disabled": True,
        "cgroupns": "private",
        "ipc_mode": "private",
        "read_only": True,
        "tmpfs": runtime_tmpfs(settings),
        "shm_size": settings.runtime_shm,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "user": settings.runtime_user,
        "pids_limit": settings.runtime_pids,
        "mem_limit": settings.runtime_memory,
        "memswap_limit": settings.runtime_memory,
        "oom_kill_disable": False,
        "nano_cpus": int(runtime_cpus(settings) * 1e9),
        "ulimits": runtime_ulimits(settings),
        "mounts": [
            Mount(target=MODEL_MOUNT, source=str(spec.model_dir), type="bind", read_only=True)
        ],
        "environment": env,
        "labels": {LABEL_NODE: node_id, LABEL_ROLE: ROLE_RUNTIME, "resultity.engine": spec.engine},
        "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "1"}),
    }
    if command is not None:
        kwargs["command"] = list(command)
    gpus = settings.gpu_ids()
    if gpus is not None:
        request = DeviceRequest(device_ids=list(gpus), capabilities=[["gpu"]])
        if not gpus:
            request = DeviceRequest(count=-1, capabilities=[["gpu"]])
        kwargs["device_requests"] = [request]
    return kwargs


DOCKER_MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
"""Docker's masked paths (20.10); a newer engine may mask more, never fewer
(`--security-opt systempaths=unconfined` empties the list)."""
DOCKER_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A `HostConfig` field whose inspected value is not one exact value: the test it must
    pass, and what it says when it fails."""

    wants: str
    test: Callable[[Any], bool]


def expected_host_config(spec: LaunchSpec, settings: Settings) -> dict[str, Any]:
    """The runtime container's whole `HostConfig` as Docker's inspection reports it for what
    `create_kwargs` asks: every field the node accepts, with its one value (or a `Rule`).

    An allow-list: a field not named here is refused unless Docker left it empty, so a
    weakening through a field that did not exist when this was written is refused too.
    """
    memory = parse_bytes(settings.runtime_memory)
    return {
        # What the node sets.
        "NetworkMode": "none",
        "IpcMode": "private",
        "CgroupnsMode": "private",
        "ReadonlyRootfs": True,
        "Privileged": False,
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "PidsLimit": settings.runtime_pids,
        "Memory": memory,
        "MemorySwap": memory,
        "OomKillDisable": False,
        "NanoCpus": int(runtime_cpus(settings) * 1e9),
        "ShmSize": parse_bytes(settings.runtime_shm),
        "Ulimits": [
            {"Name": u.name, "Soft": u.soft, "Hard": u.hard} for u in runtime_ulimits(settings)
        ],
        "Tmpfs": runtime_tmpfs(settings),
        "Mounts": [
            {"Type": "bind", "Source": str(spec.model_dir), "Target": MODEL_MOUNT, "ReadOnly": True}
        ],
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "1"}},
        "DeviceRequests": _device_requests(settings),
        # What Docker fills in by itself, at its safe default.
        "MaskedPaths": Rule(
            f"masking at least {list(DOCKER_MASKED_PATHS)}",
            lambda v: isinstance(v, list) and set(DOCKER_MASKED_PATHS) <= set(v),
        ),
        "ReadonlyPaths": Rule(
            f"read-only at least {list(DOCKER_READONLY_PATHS)}",
            lambda v: isinstance(v, list) and set(DOCKER_READONLY_PATHS) <= set(v),
        ),
        "RestartPolicy": Rule(
            "no restart policy",
            lambda v: (
                isinstance(v, dict)
                and v.get("Name") in ("", "no")
                and not v.get("MaximumRetryCount")
            ),
        ),
        # A GPU node's engine may run containers through NVIDIA's runtime by default.
        "Runtime": Rule("runc", lambda v: v == "runc" or (bool(settings.gpus) and v == "nvidia")),
        "ConsoleSize": [0, 0],
    }


def _device_requests(settings: Settings) -> list[dict[str, Any]] | None:
    """The GPU request as inspected (`Options` empty: see `_normal`): every GPU, or exactly
    the chosen ones."""
    gpus = settings.gpu_ids()
    if gpus is None:
        return None
    if not gpus:
        return [{"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}]
    return [{"Driver": "", "Count": 0, "DeviceIDs": list(gpus), "Capabilities": [["gpu"]]}]


def check_isolation(
    attrs: Mapping[str, Any],
    settings: Settings,
    *,
    spec: LaunchSpec,
    expected_env: Mapping[str, str],
    image_env: Sequence[str] = (),
) -> None:
    """Raise `IsolationError` naming every way the inspected container differs from the
    hardened one the node asked for.

    `attrs` is the container's inspection. Its `HostConfig` must be exactly
    `expected_host_config` (an allow-list); its environment is what the agent set
    (`expected_env`) over the image's own `Config.Env` (`image_env`), and nothing else; it
    runs as the runtime user without a tty, and has only the model mounted, read-only.
    """
    host = attrs.get("HostConfig") or {}
    config = attrs.get("Config") or {}
    problems = _host_problems(host, expected_host_config(spec, settings))

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(attrs.get("AppArmorProfile") != "unconfined", "AppArmor is unconfined")
    user = str(config.get("User") or "")
    uid = user.split(":", 1)[0]
    need(user == settings.runtime_user, f"user is {user!r}, not {settings.runtime_user!r}")
    need(uid not in ("", "0", "root"), f"runs as root (user {user!r})")
    # What the container really has mounted, volumes its image declares included.
    mounted = attrs.get("Mounts") or []
    for mount in mounted:
        where = mount.get("Destination")
        need(where == MODEL_MOUNT, f"unexpected mount {where} ({mount.get('Type')})")
        need(mount.get("RW") is False, f"mount {where} is writable")
    need(
        any(m.get("Destination") == MODEL_MOUNT for m in mounted),
        f"model is not mounted at {MODEL_MOUNT}",
    )
    problems.extend(_env_problems(config.get("Env") or [], expected_env, image_env))
    need(config.get("Tty") is False, "container has a tty (frames need a multiplexed stream)")
    if problems:
        raise IsolationError(
            f"runtime container {str(attrs.get('Id', '?'))[:12]} is not isolated: "
            + "; ".join(problems)
        )


def _host_problems(host: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    problems = []
    for field in sorted(set(host) | set(expected)):
        actual = host.get(field)
        if field not in expected:
            if not _empty(actual):
                problems.append(f"HostConfig.{field} is set ({actual!r}); the node allows it empty")
            continue
        wanted = expected[field]
        if isinstance(wanted, Rule):
            if not wanted.test(actual):
                problems.append(f"HostConfig.{field} is {actual!r}, not {wanted.wants}")
        elif _normal(actual) != _normal(wanted):
            problems.append(f"HostConfig.{field} is {actual!r}, not {wanted!r}")
    return problems


def _empty(value: Any) -> bool:
    """Docker's way to say "not set": null, zero, false, or an empty string, list or map."""
    return value is None or value is False or value == 0 or value in ("", [], {})


def _normal(value: Any) -> Any:
    """`value` with Docker's interchangeable spellings of "none" (null, [], {}) made one,
    and no bool passing for an int or the reverse."""
    if isinstance(value, dict):
        kept = {k: _normal(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(value, list):
        return [_normal(v) for v in value] or None
    if isinstance(value, bool):
        return ("bool", value)
    return value


def _env_problems(
    env: Sequence[str], expected: Mapping[str, str], image_env: Sequence[str]
) -> list[str]:
    allowed = dict(_env_pair(e) for e in image_env) | dict(expected)
    actual = dict(_env_pair(str(e)) for e in env)
    problems = [f"unexpected env {name}" for name in sorted(set(actual) - set(allowed))]
    problems += [
        f"env {name} differs from what the agent set"
        for name in sorted(set(actual) & set(allowed))
        if actual[name] != allowed[name]
    ]
    problems += [f"env {name} is missing" for name in sorted(set(expected) - set(actual))]
    return problems


def _env_pair(entry: str) -> tuple[str, str]:
    name, _, value = entry.partition("=")
    return name, value


def runtime_containers(client: Any, node_id: str) -> list[Any]:
    """The runtime containers of node `node_id`, running or not (by label). Blocking."""
    labels = [f"{LABEL_NODE}={node_id}", f"{LABEL_ROLE}={ROLE_RUNTIME}"]
    found: list[Any] = client.containers.list(all=True, filters={"label": labels})
    return found


class DockerBackend:
    """Launches runtime containers. `command=None` runs the image's own entrypoint."""

    name = "docker"

    def __init__(
        self,
        settings: Settings,
        *,
        node_id: str,
        client: Any = None,
        command: Sequence[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._node_id = node_id
        self._client = client
        self._owns_client = client is None
        self._command = command
        self._extra_env = dict(extra_env or {})

    async def _docker(self) -> Any:
        if self._client is None:
            # Every call bounded by the runtime's own start deadline (the SDK's default
            # is 60 s, whatever the node's settings say).
            timeout = max(1, math.ceil(self._settings.runtime_ready_timeout_s))
            self._client = await call_blocking(docker.from_env, timeout=timeout)
        return self._client

    async def remove_leftovers(self) -> int:
        client = await self._docker()
        return await call_blocking(self._remove_leftovers_blocking, client)

    def _remove_leftovers_blocking(self, client: Any) -> int:
        found = runtime_containers(client, self._node_id)
        for container in found:
            log.warning("runtime_leftover_removed container=%s", container.id[:12])
            try:
                container.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
        return len(found)

    async def launch(self, spec: LaunchSpec) -> "ContainerHandle":
        client = await self._docker()
        name = f"resultity-runtime-{self._node_id[:12]}-{uuid.uuid4().hex[:8]}"
        kwargs = create_kwargs(
            spec,
            self._settings,
            node_id=self._node_id,
            name=name,
            command=self._command,
            extra_env=self._extra_env,
        )
        handle = ContainerHandle(
            client,
            kwargs,
            self._settings,
            spec=spec,
            expected_env=expected_env(spec, self._settings, extra_env=self._extra_env),
        )
        # Opened here and handed over open: the caller's `aclose` ends it. A failed or
        # cancelled start has already closed it, container removed
        # (`AsyncResource.__aenter__`).
        await handle.__aenter__()
        return handle

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await call_blocking(client.close)


def remove_container(client: Any, ident: str) -> None:
    """Force-remove a container by id or name; absent is fine."""
    try:
        client.api.remove_container(ident, force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # removal already in progress
            raise


class ContainerHandle(AsyncResource):
    """One runtime container: created, checked, attached and started by entering it;
    stopped and removed by `aclose`."""

    def __init__(
        self,
        client: Any,
        create: dict[str, Any],
        settings: Settings,
        *,
        spec: LaunchSpec,
        expected_env: Mapping[str, str],
    ) -> None:
        super().__init__()
        self._spec = spec
        self._client = client
        self._create = create
        self._settings = settings
        self._expected_env = dict(expected_env)
        self._grace_s = settings.runtime_stop_timeout_s
        self._id = str(create["name"])  # the container's id once it exists
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._out: FrameWriter | None = None
        self._inbox = FrameInbox(self._id, max_frame_bytes=settings.runtime_max_frame_bytes)
        self._stderr = RuntimeLog(self._id)

    @property
    def ident(self) -> str:
        return self._id

    async def _open(self, stack: AsyncExitStack) -> None:
        client = self._client
        attached: list[socket.socket] = []  # filled in the thread: survives a cancellation
        try:
            container = await call_blocking(self._create_blocking, client, self._create)
            self._id = str(container.id)
            image = self._create["image"]
            image_attrs = await call_blocking(client.api.inspect_image, image)
            check_isolation(
                container.attrs,
                self._settings,
                spec=self._spec,
                expected_env=self._expected_env,
                image_env=(image_attrs.get("Config") or {}).get("Env") or [],
            )
            await call_blocking(self._attach_blocking, container, attached)
            reader, writer = await asyncio.open_unix_connection(sock=attached.pop())
        except docker.errors.DockerException as exc:
            raise RuntimeStartError(f"could not start runtime container: {exc}") from exc
        finally:
            for sock in attached:
                sock.close()
        self._reader, self._writer = reader, writer
        self._out = FrameWriter(writer, self._id)
        self._inbox = FrameInbox(self._id, max_frame_bytes=self._settings.runtime_max_frame_bytes)
        self._stderr = RuntimeLog(self._id)
        try:
            await call_blocking(container.start)
        except docker.errors.DockerException as exc:
            raise RuntimeStartError(f"could not start runtime container: {exc}") from exc
        log.info(
            "runtime_container_started container=%s image=%s engine=%s",
            self._id[:12],
            image,
            self._create["labels"].get("resultity.engine"),
        )

    @staticmethod
    def _create_blocking(client: Any, kwargs: dict[str, Any]) -> Any:
        container = client.containers.create(**kwargs)
        container.reload()
        return container

    @staticmethod
    def _attach_blocking(container: Any, attached: list[socket.socket]) -> None:
        raw = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        # Own a duplicate of the descriptor, driven by the event loop, and close the SDK's
        # socket (a `SocketIO` over it, on a unix socket) so nothing else reads from it.
        inner = getattr(raw, "_sock", raw)
        sock = socket.socket(fileno=os.dup(inner.fileno()))
        raw.close()
        inner.close()
        sock.setblocking(False)
        attached.append(sock)

    def write(self, frame: Mapping[str, object]) -> bool:
        if self._out is None:
            raise RuntimeEnded(f"runtime container {self._id[:12]} is not attached")
        return self._out.write(frame)

    async def drained(self) -> None:
        if self._out is not None:
            await self._out.drained()

    async def pump(self, deliver: Callable[[Frame], None]) -> None:
        reader = self._reader
        assert reader is not None
        demux = StreamDemux()
        try:
            while True:
                try:
                    data = await reader.read(READ_CHUNK)
                except (ConnectionError, OSError) as exc:
                    raise RuntimeEnded(f"runtime container {self._id[:12]}: {exc}") from exc
                if not data:
                    if demux.pending:
                        raise RuntimeBroken(f"runtime container {self._id[:12]} ended mid-chunk")
                    raise RuntimeEnded(f"runtime container {self._id[:12]} output ended")
                for stream, payload in demux.feed(data):
                    if stream == STDOUT:
                        for frame in self._inbox.stdout(payload):
                            deliver(frame)
                    else:
                        self._stderr.feed(payload)
        finally:
            self._stderr.flush()

    async def exit_status(self) -> str:
        """The container's state, for the log line that says why it ended."""
        try:
            attrs = await call_blocking(self._client.api.inspect_container, self._id)
        except docker.errors.DockerException as exc:
            return f"unknown ({exc})"
        state = attrs.get("State") or {}
        return (
            f"status={state.get('Status')} exit_code={state.get('ExitCode')} "
            f"oom_killed={state.get('OOMKilled')}"
        )

    async def aclose(self, *, grace_s: float | None = None) -> None:
        """Close with `grace_s` (default `runtime_stop_timeout_s`) for a clean exit; the
        first caller's grace applies."""
        if grace_s is not None and self._closing is None:
            self._grace_s = grace_s
        await super().aclose()

    async def _close(self) -> None:
        # Shutdown sequence: (1) `shutdown` frame, the explicit end of input (closing stdin
        # over the attach API is unreliable); (2) wait up to the grace for the container
        # to exit by itself, so the engine can release the GPU cleanly; (3) abort our end
        # of the socket; (4) force-remove the container, which kills it if it still runs.
        writer, grace_s = self._writer, self._grace_s
        try:
            if writer is not None and grace_s > 0 and not writer.is_closing():
                try:
                    async with asyncio.timeout(grace_s):
                        if not self.write(frames.shutdown()):
                            await self.drained()
                        await call_blocking(self._wait_blocking, grace_s)
                except (TimeoutError, RuntimeEnded):
                    pass
        finally:
            # Abort, not close: a runtime that stopped reading leaves unsent input in the
            # buffer, and a closing transport would wait for it forever. And first: while
            # the socket is open and unread, Docker cannot deliver the container's output,
            # and its kill and removal wait on that delivery (a runtime that flooded stdout
            # held a removal for the Docker API's whole read timeout).
            if writer is not None:
                writer.transport.abort()
            await call_blocking(remove_container, self._client, self._id)
            log.info("runtime_container_removed container=%s", self._id[:12])

    def _wait_blocking(self, timeout_s: float) -> None:
        try:
            self._client.api.wait(self._id, timeout=max(1, int(timeout_s + 0.999)))
        except Exception:  # timeout (requests raises its own types) or gone: remove anyway
            return
