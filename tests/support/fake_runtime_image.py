"""Runtime images for the Docker tests: the project's echo image (`worker.devtools.images`), and a
test image with `tests/support/fake_runtime.py` (and a copy of `containers.runtime`) on a Debian
base made with mmdebstrap (no registry needed).

Tagged by a hash of its sources, so it is built once per change of the runtime code.
"""

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BASE = "rst-test-base:latest"
SOURCES = [
    "schemas/__init__.py",
    "schemas/frames.py",
    "schemas/limits.py",
    "schemas/runtime_env.py",
    "tests/support/fake_runtime.py",
    *sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "containers").rglob("*.py")
        if "__pycache__" not in p.parts
    ),
]
DOCKERFILE = f"""\
FROM {BASE}
COPY app /app
ENV PYTHONPATH=/app
CMD ["python3", "-m", "containers.runtime"]
"""
FAKE_COMMAND = ["python3", "/app/tests/support/fake_runtime.py"]


def ensure_base(client: Any) -> None:
    try:
        client.images.get(BASE)
        return
    except Exception:
        pass
    pipe(
        ["mmdebstrap", "--variant=essential", "--include=python3-minimal,python3-msgpack"]
        + ["bookworm", "-"],
        ["docker", "import", "-", BASE],
    )


def pipe(producer: list[str], consumer: list[str]) -> None:
    """Run `producer | consumer`; `RuntimeError` if either fails.

    Leaves nothing open: leaving the `with` closes our end of the pipe (which also ends a
    producer whose consumer failed) and reaps the producer.
    """
    with subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as source:
        subprocess.run(consumer, stdin=source.stdout, check=True, stdout=subprocess.DEVNULL)
    if source.returncode != 0:
        raise RuntimeError(f"{producer[0]} failed")


def echo_image(client: Any) -> str:
    """The project's real echo runtime image (`worker.devtools.images`), built once and cached."""
    from worker.devtools.images import ensure_image

    return ensure_image("echo", client=client)


def ensure_test_image(client: Any) -> str:
    """This module's image, for `tests/support/fake_runtime.py` (FAKE_COMMAND)."""
    ensure_base(client)
    digest = hashlib.sha256(DOCKERFILE.encode())
    for rel in SOURCES:
        digest.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    tag = f"rst-test-runtime:{digest.hexdigest()[:16]}"
    try:
        return str(client.images.get(tag).id)
    except Exception:
        pass
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(DOCKERFILE)
        tar.addfile(info, io.BytesIO(DOCKERFILE.encode()))
        for rel in SOURCES:
            tar.add(str(ROOT / rel), arcname=f"app/{rel}")
    context.seek(0)
    image, _ = client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    return str(image.id)
