"""Registry of the subcommands defined outside `worker.cli`.

Each entry is `register(sub, make_parser)`, adding one or more subcommands.
"""

from collections.abc import Callable
from typing import Any

Register = Callable[[Any, Callable[..., Any]], None]

REGISTRY: list[Register] = []


def _images(sub: Any, make_parser: Callable[..., Any]) -> None:
    from worker.images import register

    register(sub, make_parser)


REGISTRY.append(_images)


def _network(sub: Any, make_parser: Callable[..., Any]) -> None:
    from worker.netcli import register

    register(sub, make_parser)


REGISTRY.append(_network)


def _stack(sub: Any, make_parser: Callable[..., Any]) -> None:
    from worker.stack import register

    register(sub, make_parser)


REGISTRY.append(_stack)
