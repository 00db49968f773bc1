"""`resultity-node gateway`: the OpenAI-compatible HTTP front door of a network."""

import argparse
import asyncio
import signal
from typing import Any

from worker.cli.base import add_command
from worker.core.settings import Settings


def cmd_gateway(args: argparse.Namespace) -> int:
    try:
        from worker.gateway.app import serve_until
    except ImportError as exc:
        raise ImportError(f"{exc.name} is missing: pip install 'resultity-node[gateway]'") from exc
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["gateway_host"] = args.host
    if args.port is not None:
        overrides["gateway_port"] = args.port
    settings = Settings(**overrides)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            print(f"gateway on {url}/v1 for NATS {settings.nats_url} (Ctrl-C stops)", flush=True)

        await serve_until(settings, stop.wait, ready)

    asyncio.run(go())
    return 0


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "gateway",
        "serve the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions) "
        "from the network's signed results",
        "RESULTITY_AUTHORITY_KEYS=<hex> resultity-node gateway --port 8000",
    )
    p.add_argument("--host", help="address to bind (default: RESULTITY_GATEWAY_HOST)")
    p.add_argument("--port", type=int, help="port (default: RESULTITY_GATEWAY_PORT)")
    p.set_defaults(handler=cmd_gateway)
