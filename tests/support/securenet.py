"""A nats-server as a real network runs it: TLS with a local CA, one nkey user per role
with that role's permissions (`worker.core.roles`), credentials made as `dev` makes them."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.credentials import connect_options
from worker.core.roles import Role
from worker.core.settings import Settings
from worker.devtools.devauth import DevCredentials
from worker.devtools.natsd import NatsServer


@dataclass
class SecureNats:
    server: NatsServer
    credentials: DevCredentials
    errors: list[Exception] = field(default_factory=list)
    """Every asynchronous error a connection made by `connect` was told (permission
    violations arrive this way)."""

    def settings(self, role: Role, home: Path | None = None, **overrides: Any) -> Settings:
        """`role`'s settings on this server (with `home`: a node key and directories there)."""
        values: dict[str, Any] = {
            "nats_url": self.server.url,
            "nats_insecure": False,
            "admission_required": True,
        }
        return self.credentials.settings_for(make_settings(home, **(values | overrides)), role)

    async def connect(self, role: Role) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(exc)

        return await nats.connect(
            self.server.url,
            allow_reconnect=False,
            error_cb=on_error,
            **connect_options(self.settings(role)),
        )

    def violations(self, subject: str) -> list[str]:
        # nats-py lower-cases the server's message.
        found = [str(e).lower() for e in self.errors]
        return [e for e in found if "permissions violation" in e and subject.lower() in e]

    async def wait_violation(self, subject: str, timeout_s: float = 5.0) -> str:
        """The permissions violation nats-server reported for `subject`."""
        await wait_for(lambda: bool(self.violations(subject)), timeout=timeout_s, interval=0.02)
        return self.violations(subject)[0]
