"""Shared fixtures: a real nats-server with JetStream, and a real Docker engine.

Docker and NATS tests skip with a reason on a developer machine that lacks them, and fail
instead when `CI=true`: CI must run them.
"""

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from tests.support.edges import unavailable
from tests.support.securenet import SecureNats
from worker.core.settings import Settings
from worker.devtools.devauth import ensure_dev_credentials
from worker.devtools.natsd import NatsServer, find_binary

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A bare server (no TLS, no users), for tests that do not concern authorization."""
    try:
        find_binary()
    except FileNotFoundError as exc:
        unavailable(str(exc))
    with NatsServer(tmp_path / "jetstream") as server:
        yield server


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[SecureNats]:
    """A server that requires TLS (a local CA) and nkey users with per-role permissions."""
    try:
        find_binary()
    except FileNotFoundError as exc:
        unavailable(str(exc))
    credentials = ensure_dev_credentials(tmp_path / "credentials")
    with NatsServer(
        tmp_path / "secure-jetstream",
        tls=credentials.tls,
        authorization=credentials.authorization(Settings()),
    ) as server:
        yield SecureNats(server, credentials)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        unavailable(f"no Docker engine answers ({type(exc).__name__}: {exc}); start dockerd")
    yield client
    client.close()


@pytest.fixture(scope="session")
def vectors_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Validation vectors of reference runs, shared by the tests of one session (one version
    of the code): with `DevPlan(vectors_dir=...)`, a demo model's vLLM reference run happens
    once per session instead of once per test."""
    return tmp_path_factory.mktemp("vectors")
