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
import logging
import os
import socket
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig, Mount
from docker.utils import parse_bytes

from schemas import frames
from schemas.frames import Frame
from worker.core.errors import IsolationError, RuntimeBroken, RuntimeEnded, RuntimeStartError
from worker.core.resource import finish_uncancellable
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.launch import launch_env
from worker.runtime.transport import FrameInbox, call_blocking

log = logging.getLogger(__name__)

LABEL_NODE = "resultity.node"
LABEL_ROLE = "resultity.role"
ROLE_RUNTIME = "runtime"
MODEL_MOUNT = "/model"
TMPFS_OPTIONS = "rw,noexec,nosuid,nodev,size=64m"
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
    env = launch_env(spec, settings, model_dir=MODEL_MOUNT) | dict(extra_env)
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
        "tmpfs": {"/tmp": TMPFS_OPTIONS},
        "shm_size": settings.runtime_shm,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "user": settings.runtime_user,
        "pids_limit": settings.runtime_pids,
        "mem_limit": settings.runtime_memory,
        "memswap_limit": settings.runtime_memory,
        "mounts": [
            Mount(target=MODEL_MOUNT, source=str(spec.model_dir), type="bind", read_only=True)
        ],
        "environment": env,
        "labels": {LABEL_NODE: node_id, LABEL_ROLE: ROLE_RUNTIME, "resultity.engine": spec.engine},
        "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "1"}),
    }
    if command is not None:
        kwargs["command"] = list(command)
    if settings.gpus:
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return kwargs


def check_isolation(attrs: Mapping[str, Any], settings: Settings) -> None:
    """Raise `IsolationError` naming every hardening setting the inspected container lacks."""
    host = attrs.get("HostConfig") or {}
    config = attrs.get("Config") or {}
    problems: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(host.get("NetworkMode") == "none", f"network mode is {host.get('NetworkMode')!r}")
    need(host.get("ReadonlyRootfs") is True, "root filesystem is writable")
    need(host.get("Privileged") is False, "container is privileged")
    need("ALL" in (host.get("CapDrop") or []), "capabilities are not all dropped")
    need(not host.get("CapAdd"), f"capabilities added: {host.get('CapAdd')}")
    need(
        any(
            o.startswith("no-new-privileges") and not o.endswith("false")
            for o in host.get("SecurityOpt") or []
        ),
        "no-new-privileges is not set",
    )
    user = str(config.get("User") or "")
    uid = user.split(":", 1)[0]
    need(user == settings.runtime_user, f"user is {user!r}, not {settings.runtime_user!r}")
    need(uid not in ("", "0", "root"), f"runs as root (user {user!r})")
    need((host.get("PidsLimit") or 0) > 0, "no pids limit")
    need(
        host.get("Memory") == parse_bytes(settings.runtime_memory),
        f"memory limit is {host.get('Memory')}, not {settings.runtime_memory}",
    )
    for mode in ("PidMode", "IpcMode", "UTSMode", "UsernsMode", "CgroupnsMode"):
        need(host.get(mode) != "host", f"{mode} is host")
    need(not host.get("Devices"), f"host devices passed: {host.get('Devices')}")
    need(not host.get("Binds"), f"bind volumes present: {host.get('Binds')}")
    need(not host.get("VolumesFrom"), "volumes from another container")
    mounts = host.get("Mounts") or []
    for mount in mounts:
        need(mount.get("ReadOnly") is True, f"mount {mount.get('Target')} is writable")
    need(
        any(m.get("Target") == MODEL_MOUNT for m in mounts),
        f"model is not mounted at {MODEL_MOUNT}",
    )
    tmpfs = host.get("Tmpfs") or {}
    need(set(tmpfs) <= {"/tmp"}, f"unexpected tmpfs mounts {sorted(tmpfs)}")
    gpus = host.get("DeviceRequests") or []
    need(settings.gpus or not gpus, "GPUs passed although the node is not configured for them")
    need(config.get("Tty") is False, "container has a tty (frames need a multiplexed stream)")
    if problems:
        raise IsolationError(
            f"runtime container {str(attrs.get('Id', '?'))[:12]} is not isolated: "
            + "; ".join(problems)
        )


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
            self._client = await call_blocking(docker.from_env)
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
        container: Any = None
        attached: list[socket.socket] = []  # filled in the thread: survives a cancellation
        try:
            container = await call_blocking(self._create_blocking, client, kwargs)
            check_isolation(container.attrs, self._settings)
            await call_blocking(self._attach_blocking, container, attached)
            await call_blocking(container.start)
            log.info(
                "runtime_container_started container=%s image=%s engine=%s",
                container.id[:12],
                spec.image,
                spec.engine,
            )
            reader, writer = await asyncio.open_unix_connection(sock=attached.pop())
            return ContainerHandle(client, container.id, reader, writer, self._settings)
        except BaseException as exc:
            for sock in attached:
                sock.close()
            await finish_uncancellable(
                call_blocking(remove_container, client, container.id if container else name)
            )
            if isinstance(exc, docker.errors.DockerException):
                raise RuntimeStartError(f"could not start runtime container: {exc}") from exc
            raise

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


class ContainerHandle:
    """One running runtime container, attached."""

    def __init__(
        self,
        client: Any,
        container_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: Settings,
    ) -> None:
        self._client = client
        self._id = container_id
        self._reader = reader
        self._writer = writer
        self._inbox = FrameInbox(container_id, max_frame_bytes=settings.runtime_max_frame_bytes)
        self._closing: asyncio.Future[None] | None = None

    @property
    def ident(self) -> str:
        return self._id

    async def send(self, frame: Mapping[str, object]) -> None:
        if self._writer.is_closing():
            raise RuntimeEnded(f"runtime container {self._id[:12]} is closed")
        try:
            self._writer.write(frames.pack(frame))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise RuntimeEnded(f"runtime container {self._id[:12]} stdin is gone: {exc}") from exc

    async def pump(self, deliver: Callable[[Frame], None]) -> None:
        demux = StreamDemux()
        try:
            while True:
                try:
                    data = await self._reader.read(READ_CHUNK)
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
                        self._inbox.stderr(payload)
        finally:
            self._inbox.flush()

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

    async def aclose(self, *, grace_s: float) -> None:
        # Shutdown sequence: (1) `shutdown` frame, the explicit end of input (closing stdin
        # over the attach API is unreliable); (2) wait up to `grace_s` for the container to
        # exit by itself, so the engine can release the GPU cleanly; (3) force-remove it,
        # which kills it if it is still running; (4) close our end of the socket.
        # The whole sequence runs to the end even if the caller is cancelled.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(grace_s))
        await finish_uncancellable(self._closing)

    async def _close(self, grace_s: float) -> None:
        try:
            if grace_s > 0 and not self._writer.is_closing():
                try:
                    async with asyncio.timeout(grace_s):
                        await self.send(frames.shutdown())
                        await call_blocking(self._wait_blocking, grace_s)
                except (TimeoutError, RuntimeEnded):
                    pass
        finally:
            try:
                await finish_uncancellable(call_blocking(remove_container, self._client, self._id))
                log.info("runtime_container_removed container=%s", self._id[:12])
            finally:
                # Abort, not close: a runtime that stopped reading leaves unsent input in
                # the buffer, and a closing transport would wait for it forever.
                self._writer.transport.abort()

    def _wait_blocking(self, timeout_s: float) -> None:
        try:
            self._client.api.wait(self._id, timeout=max(1, int(timeout_s + 0.999)))
        except Exception:  # timeout (requests raises its own types) or gone: remove anyway
            return
