"""`resultity-node dev`: the whole network on this machine."""

import argparse
import asyncio
from pathlib import Path
from typing import Any

from worker.cli.base import add_command
from worker.cli.submit import print_outcome
from worker.devtools.devnet import DevPlan, choose, run_dev


def cmd_dev(args: argparse.Namespace) -> int:
    engine, backend = choose(args.engine, args.backend)
    gateway_port = None if args.no_gateway else args.gateway_port
    plan = DevPlan(
        Path(args.home).expanduser(), args.port, engine, backend, args.prompt, gateway_port
    )

    def show(outcome: Any) -> None:
        print("\n=== verified signed result ===", flush=True)
        print_outcome(outcome)
        if not args.once:
            print(
                '\nthe node keeps serving; try: resultity-node submit "Hello"  (Ctrl-C stops)',
                flush=True,
            )

    asyncio.run(run_dev(plan, on_result=show, serve_forever=not args.once))
    return 0


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "dev",
        "run the whole network locally and print one verified signed result",
        "resultity-node dev            # then, in another shell: resultity-node submit Hi",
    )
    p.add_argument("--home", default="~/.resultity/dev", help="keys, NATS data, model cache")
    p.add_argument("--port", type=int, default=4222, help="NATS client port (0: any free)")
    p.add_argument(
        "--engine",
        choices=["auto", "echo", "vllm"],
        default="auto",
        help="auto: vllm (tiny Llama) with Docker, else echo",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "docker", "process"],
        default="auto",
        help="auto: docker when a Docker engine answers, else a local process",
    )
    p.add_argument("--prompt", default="Resultity nodes sign every result", help="demo prompt")
    p.add_argument("--once", action="store_true", help="exit after the demo result")
    p.add_argument(
        "--gateway-port", type=int, default=8000, help="port of the OpenAI gateway on 127.0.0.1"
    )
    p.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI gateway")
    p.set_defaults(handler=cmd_dev)
