"""`resultity-node images build`: runtime images built locally."""

import sys
from typing import Any

from worker.cli.base import add_command
from worker.devtools.images import ENGINES, LOCAL_ENGINES, ensure_image


def register(sub: Any) -> None:
    """`resultity-node images build`."""
    images = add_command(
        sub,
        "images",
        "build the runtime images locally",
        "resultity-node images build --engine echo",
    )
    actions = images.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    build = add_command(
        actions,
        "build",
        "build runtime images (cached) and print one line per image: engine, tab, image id",
        "resultity-node images build --engine echo --engine vllm-cpu",
    )
    build.add_argument(
        "--engine",
        action="append",
        choices=ENGINES,
        help=f"image to build; repeatable (default: {' '.join(LOCAL_ENGINES)})",
    )
    build.add_argument("--base", help="base image to build on (default: see RESULTITY_IMAGE_BASE)")
    build.set_defaults(handler=_cmd_build)


def _cmd_build(args: Any) -> int:
    for engine in args.engine or LOCAL_ENGINES:
        image_id = ensure_image(engine, base=args.base)
        sys.stdout.write(f"{engine}\t{image_id}\n")
        sys.stdout.flush()
    return 0
