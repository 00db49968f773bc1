"""`resultity-node doctor`: what stops this machine from running the node's runtime, and
how to fix it (see `worker.runtime.doctor`)."""

import sys
from typing import Any

from worker.cli.base import add_command
from worker.core.settings import Settings
from worker.runtime.doctor import Status, examine


def register(sub: Any) -> None:
    """`resultity-node doctor`."""
    p = add_command(
        sub,
        "doctor",
        "check this machine for a node: Docker, NVIDIA driver and container toolkit, the "
        "chosen GPUs inside a hardened runtime container, its JIT cache, free GPU memory; "
        "exit 1 when something is wrong",
        "RESULTITY_GPUS=0,1 resultity-node doctor",
    )
    p.add_argument(
        "--image",
        help="runtime image to probe with (default: the echo runtime image, built if missing)",
    )
    p.set_defaults(handler=_cmd_doctor)


def _cmd_doctor(args: Any) -> int:
    settings = Settings()
    client = _docker()
    image = args.image
    if image is None and client is not None:
        from worker.devtools.images import ensure_image

        sys.stdout.write("building or finding the echo runtime image to probe with...\n")
        sys.stdout.flush()
        image = ensure_image("echo", client=client)
    findings = examine(settings, image=image, client=client)
    for finding in findings:
        sys.stdout.write("\n".join(finding.lines()) + "\n")
    failed = [f for f in findings if f.status is Status.FAIL]
    sys.stdout.write(f"{len(failed)} problem(s) found\n" if failed else "no problem found\n")
    if client is not None:
        client.close()
    return 1 if failed else 0


def _docker() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception:
        return None
    return client
