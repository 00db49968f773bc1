"""What every command module shares: the user-facing error and the parser shape."""

import argparse
from typing import Any


class CliError(Exception):
    """A user-facing failure: one line saying what to do; exit status 2."""


def add_command(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows `help` and one example."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def jsonable(value: Any) -> Any:
    """`value` with bytes as {"hex": ...}, for printing msgpack bodies as JSON."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
