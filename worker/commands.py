"""Registry of the subcommands defined outside `worker.cli`.

Each entry is `register(sub, make_parser)`, adding one or more subcommands.
"""

from collections.abc import Callable
from typing import Any

Register = Callable[[Any, Callable[..., Any]], None]

REGISTRY: list[Register] = []
