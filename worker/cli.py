"""The `resultity-node` command line: the only module that prints."""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worker.errors import NodeError

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user-facing failure: one line saying what to do; exit status 2."""


def _parser(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def cmd_keygen(args: argparse.Namespace) -> int:
    from worker.signing import write_key_file

    key = write_key_file(Path(args.out))
    print(key.node_id)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from worker.signing import parse_public_key, verify

    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    authorities = [parse_public_key(k) for k in args.authority]
    verified = verify(data, authority_keys=authorities)
    print(
        json.dumps(
            {
                "typ": verified.typ.value,
                "signer": verified.signer,
                "body": _jsonable(verified.body),
            },
            indent=2,
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from worker.agent import run_until_signalled
    from worker.settings import Settings
    from worker.signing import load_key_file

    settings = Settings()
    key = load_key_file(settings.key_file)
    asyncio.run(run_until_signalled(settings, key))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    import asyncio

    import nats

    from worker.provision import provision
    from worker.settings import Settings

    settings = Settings()

    async def go() -> None:
        nc = await nats.connect(settings.nats_url.split(","), connect_timeout=5)
        try:
            await provision(nc.jetstream(), settings, list(args.model))
        finally:
            await nc.close()

    asyncio.run(go())
    print(f"provisioned streams and consumers for models: {', '.join(args.model) or '(none)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resultity-node",
        description="Resultity node: signed, supervised LLM inference for a NATS network.",
        epilog="example:\n  resultity-node dev",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _parser(
        sub,
        "keygen",
        "create a node key file and print the node id",
        "resultity-node keygen --out ~/.resultity/node.key",
    )
    p.add_argument("--out", required=True, help="path of the new key file (mode 0600)")
    p.set_defaults(handler=cmd_keygen)

    p = _parser(
        sub,
        "verify",
        "verify a signed envelope and print its body and signer",
        "resultity-node verify result.msgpack --authority <hex>",
    )
    p.add_argument("file", nargs="?", default="-", help="envelope file, or - for stdin")
    p.add_argument(
        "--authority",
        action="append",
        default=[],
        help="trusted authority public key (hex) for config envelopes; repeatable",
    )
    p.set_defaults(handler=cmd_verify)

    p = _parser(
        sub,
        "run",
        "run the node agent until SIGTERM/SIGINT (settings: RESULTITY_*)",
        "RESULTITY_NATS_URL=nats://10.0.0.5:4222 RESULTITY_AUTHORITY_KEYS=<hex> resultity-node run",
    )
    p.set_defaults(handler=cmd_run)

    p = _parser(
        sub,
        "provision",
        "create the JetStream streams and the job consumers (idempotent)",
        "resultity-node provision --model tiny-llama",
    )
    p.add_argument("--model", action="append", default=[], help="model id; repeatable")
    p.set_defaults(handler=cmd_provision)

    for register in _extensions():
        register(sub, _parser)
    return parser


def _extensions() -> list[Callable[[Any, Callable[..., argparse.ArgumentParser]], None]]:
    """Subcommands that live beside the code they drive, each `register(sub, make_parser)`."""
    from worker import commands

    return commands.REGISTRY


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from worker.logs import setup_logging

    setup_logging(verbose=args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (NodeError, CliError, ValueError, OSError) as exc:
        print(f"resultity-node {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
