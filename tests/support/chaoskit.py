"""Chaos helpers: a 3-server NATS cluster on loopback (TLS for clients and routes, a user
per role, as `dev` runs NATS), agents as subprocesses, a steady job publisher, and the
checker that every job ended with exactly one verified outcome."""

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from schemas.codec import validate
from schemas.event import ErrorEvent
from schemas.result import ResultBody
from tests.support.jobnet import read_all
from worker.core.credentials import connect_options
from worker.core.roles import Role
from worker.core.settings import Settings
from worker.core.signing import verify
from worker.devtools.devauth import DevCredentials
from worker.devtools.natsd import NatsServer
from worker.models.objectstore import put_file
from worker.runtime.container import runtime_containers

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> list[int]:
    """Loopback ports free right now (held open together, so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """Three clustered nats-server processes with JetStream (file storage), on loopback;
    TLS (clients and routes) and per-role users from `credentials`."""

    def __init__(self, root: Path, credentials: DevCredentials, size: int = 3) -> None:
        self.credentials = credentials
        ports = free_ports(2 * size)
        client_ports, route_ports = ports[:size], ports[size:]
        routes = [f"nats-route://127.0.0.1:{p}" for p in route_ports]
        self.servers = [
            NatsServer(
                root / f"n{i}",
                port=client_ports[i],
                name=f"chaos-n{i}",
                cluster_port=route_ports[i],
                routes=[r for j, r in enumerate(routes) if j != i],
                cluster_name="chaos",
                tls=credentials.tls,
                authorization=credentials.authorization(Settings()),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def settings(self, settings: Settings, role: Role) -> Settings:
        return self.credentials.settings_for(settings, role)

    async def connect(self, role: Role) -> Client:
        """A connection as `role` that rides out server kills."""
        options = connect_options(self.settings(Settings(), role))
        return await nats.connect(
            self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **options
        )

    async def wait_jetstream(self, timeout: float = 60.0) -> None:
        """Until the cluster has a JetStream meta leader (account info answers)."""
        nc = await self.connect(Role.AUTHORITY)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()


@dataclass
class AgentProc:
    """One `resultity-node run` subprocess; restarted under the same key and directories."""

    name: str
    env: dict[str, str]
    logs: Path
    node_id: str
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0
    unexpected_exits: list[int] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self.generation += 1
        self._close_log()
        self._log = open(self.logs / f"{self.name}-{self.generation}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli.main", "run"],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> bool:
        if not self.alive:
            return False
        assert self.proc is not None
        self.proc.send_signal(sig)
        return True

    def kill(self) -> bool:
        if not self.signal(signal.SIGKILL):
            return False
        assert self.proc is not None
        self.proc.wait(10)
        return True

    def check_exit(self) -> int | None:
        """The exit code if the process ended by itself (a crash the chaos did not cause)."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.unexpected_exits.append(code)
            self.proc = None
            return code
        return None

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait; the exit code, or None if it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        """Every generation's log, in order."""
        texts = []
        for generation in range(1, self.generation + 1):
            with contextlib.suppress(OSError):
                path = self.logs / f"{self.name}-{generation}.log"
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def log_tail(self, lines: int = 30) -> str:
        path = self.logs / f"{self.name}-{self.generation}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def agent_env(settings: Settings, home: Path, node_key: Path, cluster: Cluster) -> dict[str, str]:
    """The environment of one agent subprocess: only RESULTITY_* and what Python needs; the
    node role's credentials and the CA."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    env.update(
        {
            "RESULTITY_NATS_URL": ",".join(cluster.urls),
            "RESULTITY_NATS_CA": str(cluster.credentials.tls.ca),
            "RESULTITY_NATS_NKEY_SEED_FILE": str(cluster.credentials.seeds[Role.NODE]),
            "RESULTITY_KEY_FILE": str(node_key),
            "RESULTITY_AUTHORITY_KEYS": ",".join(settings.authority_keys),
            "RESULTITY_CACHE_DIR": str(home / "cache"),
            "RESULTITY_STATE_DIR": str(home / "state"),
            "RESULTITY_RUNTIME_BACKEND": "docker",
            "RESULTITY_STREAM_REPLICAS": str(settings.stream_replicas),
            "RESULTITY_ACK_WAIT_S": str(settings.ack_wait_s),
            "RESULTITY_MAX_DELIVER": str(settings.max_deliver),
            "RESULTITY_DUPLICATE_WINDOW_S": str(settings.duplicate_window_s),
            "RESULTITY_SHUTDOWN_GRACE_S": str(settings.shutdown_grace_s),
            "RESULTITY_MAX_IN_FLIGHT": str(settings.max_in_flight),
            "RESULTITY_RUNTIME_MEMORY": settings.runtime_memory,
            "RESULTITY_RUNTIME_PIDS": str(settings.runtime_pids),
            "RESULTITY_RUNTIME_SHM": settings.runtime_shm,
            "RESULTITY_RUNTIME_STOP_TIMEOUT_S": str(settings.runtime_stop_timeout_s),
            "RESULTITY_RUNTIME_READY_TIMEOUT_S": str(settings.runtime_ready_timeout_s),
            "RESULTITY_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
            "RESULTITY_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "RESULTITY_SWITCH_MIN_RESIDENCY_S": str(settings.switch_min_residency_s),
            "RESULTITY_SWITCH_CHECK_INTERVAL_S": str(settings.switch_check_interval_s),
            "RESULTITY_SWITCH_GRACE_S": str(settings.switch_grace_s),
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


class LoadPublisher:
    """Publishes jobs at a bounded rate until told to stop or `max_jobs` are out; each job
    is retried under the same `Nats-Msg-Id` until the stream acknowledges it."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        model: str,
        rate: float,
        max_jobs: int,
        prefix: str = "chaos",
    ):
        self._nc = nc
        self._prefix = prefix
        self._settings = settings
        self._model = model
        self._rate = rate
        self._max = max_jobs
        self.acked: list[str] = []
        self.unconfirmed: list[str] = []
        self.retries = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        js = self._nc.jetstream()
        subject = self._settings.subject("jobs", self._model)
        started = time.monotonic()
        for i in range(self._max):
            if self.stop.is_set():
                return
            due = started + i / self._rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            job_id = f"{self._prefix}-{i:06d}"
            body = {
                "job_id": job_id,
                "model_id": self._model,
                "prompt": f"chaos job {i}",
                "params": {"max_tokens": 8, "seed": i},
            }
            data = msgpack.packb(body)
            for attempt in range(120):
                try:
                    await js.publish(subject, data, headers={"Nats-Msg-Id": job_id}, timeout=2)
                    self.acked.append(job_id)
                    break
                except Exception as exc:
                    self.retries += 1
                    log.debug("chaos_publish_retry job_id=%s try=%d error=%r", job_id, attempt, exc)
                    await asyncio.sleep(0.25)
            else:
                self.unconfirmed.append(job_id)


@dataclass
class Outcomes:
    results: Counter[str]
    result_signers: Counter[str]
    result_models: Counter[str]
    terminal: Counter[str]
    retryable: int
    bad_signatures: int
    stored_results: int


async def collect(nc: Client, settings: Settings, *, attempts: int = 10) -> Outcomes:
    """`collect_once`, retried while the cluster is still electing stream leaders after the
    last server kill (reads then time out: that is the checker's trouble, not the node's)."""
    for attempt in range(1, attempts + 1):
        try:
            return await collect_once(nc, settings)
        except (
            nats.errors.TimeoutError,
            nats.js.errors.ServiceUnavailableError,
            nats.errors.NoRespondersError,
        ):
            if attempt == attempts:
                raise
            await asyncio.sleep(2)
    raise AssertionError("unreachable")


async def collect_once(nc: Client, settings: Settings) -> Outcomes:
    """Every result and error event in the streams, each envelope's signature verified."""
    js = nc.jetstream()
    results: Counter[str] = Counter()
    signers: Counter[str] = Counter()
    models: Counter[str] = Counter()
    bad = 0
    for data in await read_all(js, settings.stream("RESULTS"), settings.subject("results", ">")):
        try:
            body = validate(ResultBody, verify(data).body)
        except Exception:
            bad += 1
            continue
        results[body.job_id] += 1
        signers[body.node_id] += 1
        models[body.model.id] += 1
    terminal: Counter[str] = Counter()
    retryable = 0
    subject = settings.subject("events", "error", ">")
    for data in await read_all(js, settings.stream("EVENTS"), subject):
        try:
            event = validate(ErrorEvent, verify(data).body)
        except Exception:
            bad += 1
            continue
        if event.retryable:
            retryable += 1
        elif event.job_id is not None:
            terminal[event.job_id] += 1
    info = await js.stream_info(settings.stream("RESULTS"))
    return Outcomes(results, signers, models, terminal, retryable, bad, info.state.messages)


@dataclass
class Verdict:
    lost: list[str]
    duplicated: list[str]
    both: list[str]
    strangers: list[str]

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.both or self.strangers)


def judge(published: list[str], outcomes: Outcomes) -> Verdict:
    """Exactly one verified result or one terminal error per published job; nothing else."""
    jobs = set(published)
    lost = [j for j in published if outcomes.results[j] + outcomes.terminal[j] == 0]
    duplicated = [j for j in published if outcomes.results[j] > 1 or outcomes.terminal[j] > 1]
    both = [j for j in published if outcomes.results[j] and outcomes.terminal[j]]
    strangers = sorted((set(outcomes.results) | set(outcomes.terminal)) - jobs)
    return Verdict(lost, duplicated, both, strangers)


def runtime_containers_of(client: Any, node_ids: list[str]) -> list[Any]:
    """Running or stopped runtime containers of these nodes (by label)."""
    return [c for node_id in node_ids for c in runtime_containers(client, node_id)]


async def put_blob_model(nc: Client, settings: Settings, root: Path, name: str) -> dict[str, Any]:
    """A second model for the echo engine (any bytes do) in the object store; its spec for a
    snapshot (no validation vectors)."""
    data = f"model {name} ".encode() * 1000
    path = root / f"{name}.bin"
    path.write_bytes(data)
    await put_file(nc.jetstream(), settings.models_bucket, name, path)
    return {
        "id": name,
        "version": "1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "source": f"nats-object://{settings.models_bucket}/{name}",
        "validation": [],
    }
