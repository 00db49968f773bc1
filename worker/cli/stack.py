"""`resultity-node stack prepare|seed`: the Docker Compose stack."""

import asyncio
import sys
from pathlib import Path
from typing import Any

from worker.cli.base import add_command
from worker.devtools.stack import COMPOSE_FILE, DEFAULT_STACK_DIR, prepare, seed


def register(sub: Any) -> None:
    """`resultity-node stack prepare|seed`."""
    stack = add_command(
        sub,
        "stack",
        "prepare and seed the Docker Compose stack (docker-compose.yml)",
        "resultity-node stack prepare && "
        "docker-compose --env-file ~/.resultity/stack/stack.env up -d",
    )
    actions = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    p = add_command(
        actions,
        "prepare",
        "create keys (0600) and env files, build the NATS, agent, echo runtime and"
        " Prometheus (and, where its base can be had, Grafana) images",
        "resultity-node stack prepare --dir ~/.resultity/stack",
    )
    p.add_argument("--dir", default=str(DEFAULT_STACK_DIR), help="stack directory")
    p.add_argument("--base", help="base image of the agent and runtime images (default: auto)")
    p.set_defaults(handler=_cmd_prepare)
    p = add_command(
        actions,
        "seed",
        "as the network: provision, publish the demo model and a signed snapshot (the seeder)",
        "resultity-node stack seed --authority-key /run/secrets/authority_key "
        "--image sha256:<echo image id>",
    )
    p.add_argument("--authority-key", required=True, help="authority key file (mode 0600)")
    p.add_argument("--image", required=True, help="runtime image to pin: sha256:<image id>")
    p.add_argument("--engine", default="echo", choices=("echo", "vllm"), help="demo engine")
    p.add_argument("--home", default="/var/lib/resultity/seed", help="demo model workspace")
    p.add_argument(
        "--admit", action="append", default=[], help="node id to admit to the network; repeatable"
    )
    p.set_defaults(handler=_cmd_seed)


def _cmd_prepare(args: Any) -> int:
    stack = prepare(Path(args.dir), base=args.base)
    env = stack.env_file
    sys.stdout.write(
        f"node id    {stack.node_id}\n"
        f"authority  {stack.authority_id}\n"
        f"images     {stack.nats.tag}  {stack.agent.tag}  runtime {stack.runtime_image}\n"
        f"start      docker-compose -f {COMPOSE_FILE} --env-file {env} up -d\n"
        f"stop       docker-compose -f {COMPOSE_FILE} --env-file {env} down\n"
        "metrics    Prometheus on http://127.0.0.1:9090 (the node's own on 127.0.0.1:9464)\n"
    )
    if stack.grafana is not None:
        sys.stdout.write(
            f"dashboard  docker-compose -f {COMPOSE_FILE} --env-file {env} --profile dashboard"
            " up -d; then http://127.0.0.1:3000\n"
        )
    else:
        sys.stdout.write(
            "dashboard  Grafana's image could not be built here (no registry answers and none"
            " is present; Debian does not package it): the dashboard's queries work in"
            " Prometheus\n"
        )
    return 0


def _cmd_seed(args: Any) -> int:
    version = asyncio.run(
        seed(
            Path(args.home),
            Path(args.authority_key),
            args.image,
            engine=args.engine,
            admit=tuple(args.admit),
        )
    )
    sys.stdout.write(f"snapshot {version} published\n")
    return 0
