"""Runtime images pinned by digest: make sure the exact image named by a snapshot is present.

`name@sha256:<digest>` is pulled if absent and must list that digest in its RepoDigests;
`sha256:<image id>` names an image already loaded on the node. Nothing else is accepted.
The Docker SDK blocks, so it runs in a worker thread.
"""

import asyncio
import logging
import re
from typing import Any

from schemas.snapshot import IMAGE_DIGEST_PATTERN, IMAGE_ID_PATTERN
from worker.core.errors import ImageUnavailable

log = logging.getLogger(__name__)


def _repo(name: str) -> str:
    """Normalise a repository name the way Docker Hub shortens it."""
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/library/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name.startswith("library/"):
        name = name[len("library/") :]
    return name


def _ensure_image_sync(client: Any, image: str) -> str:
    import docker.errors

    if re.fullmatch(IMAGE_ID_PATTERN, image):
        try:
            found = client.images.get(image)
        except docker.errors.ImageNotFound as exc:
            raise ImageUnavailable(
                f"runtime image {image} is not loaded on this node; load it with "
                "'docker load' (an image named by its ID is never pulled)"
            ) from exc
        if found.id != image:
            raise ImageUnavailable(f"runtime image {image} resolved to {found.id}")
        return str(found.id)
    if not re.fullmatch(IMAGE_DIGEST_PATTERN, image):
        raise ImageUnavailable(
            f"runtime image {image!r} is not pinned: use 'name@sha256:<digest>' or 'sha256:<id>'"
        )
    repo, _, digest = image.partition("@")
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        log.info("runtime_image_pull image=%s", image)
        try:
            found = client.images.pull(repo, tag=digest)
        except docker.errors.APIError as exc:
            raise ImageUnavailable(f"runtime image {image} could not be pulled: {exc}") from exc
    repo_digests = found.attrs.get("RepoDigests") or []
    for entry in repo_digests:
        name, _, got = entry.partition("@")
        if got == digest and _repo(name) == _repo(repo):
            return str(found.id)
    raise ImageUnavailable(
        f"runtime image {image}: digest not found in the image's RepoDigests {repo_digests}"
    )


async def ensure_image(client: Any, image: str) -> str:
    """Check (pulling if needed) the pinned image; returns its local image ID.

    `client` is a `docker.DockerClient`. Raises `ImageUnavailable` saying what to do.
    """
    return await asyncio.to_thread(_ensure_image_sync, client, image)
