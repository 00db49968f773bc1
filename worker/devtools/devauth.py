"""The dev network's credentials, made once under its home and kept: a local CA and the NATS
server's certificate (`tls/`), one nkey user seed per role (`creds/<role>.nk`), and a
gateway API key (`gateway.keys`). Every file is mode 0600.

A home made before these existed gets them at the next start: nothing else in it changes.
"""

import secrets
from dataclasses import dataclass
from pathlib import Path

from worker.core.credentials import new_user_seed, user_public_key, write_secret
from worker.core.roles import Role, authorization_block
from worker.core.settings import Settings
from worker.devtools.localca import TlsFiles, ensure_local_ca

API_KEY_PREFIX = "rst-"


@dataclass(frozen=True, slots=True)
class DevCredentials:
    tls: TlsFiles
    seeds: dict[Role, Path]
    users: dict[Role, str]
    """The public nkey (`U...`) of each role's user."""
    api_keys_file: Path

    def authorization(self, settings: Settings) -> str:
        """The nats-server `authorization` block: one user per role."""
        return authorization_block(
            {role: [key] for role, key in self.users.items()},
            prefix=settings.subject_prefix,
            models_bucket=settings.models_bucket,
        )

    def settings_for(self, settings: Settings, role: Role) -> Settings:
        """`settings` as `role` connects: its seed, the CA."""
        return settings.model_copy(
            update={
                "nats_nkey_seed_file": self.seeds[role],
                "nats_ca": self.tls.ca,
                "gateway_api_keys_file": self.api_keys_file,
            }
        )

    def api_key(self) -> str:
        """The first key of the gateway's key file (dev prints it)."""
        return read_api_keys(self.api_keys_file)[0]


def read_api_keys(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def ensure_dev_credentials(
    home: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> DevCredentials:
    """The dev network's credentials under `home`, made where missing; the servers'
    certificate is valid for `names`."""
    tls = ensure_local_ca(home / "tls", names)
    seeds: dict[Role, Path] = {}
    users: dict[Role, str] = {}
    for role in Role:
        path = home / "creds" / f"{role.value}.nk"
        users[role] = user_public_key(path) if path.exists() else new_user_seed(path)
        seeds[role] = path
    keys = home / "gateway.keys"
    if not keys.exists():
        write_secret(keys, f"{API_KEY_PREFIX}{secrets.token_urlsafe(24)}\n".encode())
    return DevCredentials(tls, seeds, users, keys)
