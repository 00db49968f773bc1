"""The `resultity-node` command line: builds the parser from one module per command group."""

import argparse
import sys
from collections.abc import Callable, Sequence

from worker.cli import dev, doctor, gateway, images, network, node, stack, submit
from worker.cli.base import CliError
from worker.core.errors import NodeError, ToolError
from worker.core.logs import setup_logging

Handler = Callable[[argparse.Namespace], int]
GROUPS = (node, submit, gateway, dev, network, images, stack, doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resultity-node",
        description="Resultity node: signed, supervised LLM inference for a NATS network.",
        epilog="example:\n  resultity-node dev",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (NodeError, ToolError, CliError, ValueError, OSError) as exc:
        print(f"resultity-node {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
