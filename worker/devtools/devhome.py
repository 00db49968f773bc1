"""How client commands find a running `dev` network with no environment set.

`resultity-node dev` writes `client.json` under its home (default `~/.resultity/dev`) once
its network is up, and removes it when it stops (a home that group or others may write is
refused: `make_home`):

    {"network": "dev", "nats_url": "tls://127.0.0.1:4222", "authority_keys": ["<hex>"],
     "node_id": "<hex>", "key_file": "<home>/node.key", "subject_prefix": "rst",
     "nats_nkey_seed_file": "<home>/creds/client.nk", "nats_ca": "<home>/tls/ca.pem",
     "gateway_api_keys_file": "<home>/gateway.keys",
     "gateway_url": "http://127.0.0.1:8000/v1", "gateway_api_key": "rst-..."}

The client's credentials (the `client` role's nkey seed, the dev CA) come with it; the
gateway's URL and API key let the official `openai` client talk to the dev gateway
(`OpenAI(base_url=..., api_key=...)`).

Every client command (`submit`, `status`, `verify`, the gateway) takes its settings from
`client_settings()`: when `RESULTITY_NATS_URL` is unset and that file exists, its values
fill every setting no `RESULTITY_*` variable gives; otherwise the environment (and the
defaults) alone. `RESULTITY_DEV_HOME` points at a dev home other than the default. The
returned `ClientNetwork.describe()` is the one line a command prints on stderr to say
which network it talks to.
"""

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.core.settings import DEFAULT_HOME, Settings
from worker.core.statefile import write_atomically

log = logging.getLogger(__name__)

DEFAULT_DEV_HOME = DEFAULT_HOME / "dev"
CLIENT_FILE = "client.json"
HOME_VARIABLE = "RESULTITY_DEV_HOME"
SHARED_SETTINGS = (
    "nats_url",
    "authority_keys",
    "key_file",
    "subject_prefix",
    "nats_nkey_seed_file",
    "nats_ca",
    "gateway_api_keys_file",
)
"""The settings a dev network hands to its clients."""


@dataclass(frozen=True, slots=True)
class ClientNetwork:
    """The settings a client command uses, where they came from, and the dev node's id."""

    settings: Settings
    dev_file: Path | None
    """The dev network's `client.json` the settings came from, if any."""
    node_id: str | None

    def describe(self) -> str:
        url = self.settings.nats_url
        if self.dev_file is not None:
            return f"network: dev at {url} (from {self.dev_file})"
        if "RESULTITY_NATS_URL" in os.environ:
            return f"network: {url} (RESULTITY_NATS_URL)"
        return f"network: {url} (default; no running dev network at {dev_home() / CLIENT_FILE})"


def dev_home() -> Path:
    configured = os.environ.get(HOME_VARIABLE)
    return Path(configured).expanduser() if configured else DEFAULT_DEV_HOME


def make_home(home: Path) -> None:
    """Create the dev home (0700) if it is missing, and refuse one that others may write
    in: they could plant a link where `dev` writes, or swap its keys."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_home(home)


def check_home(home: Path) -> None:
    """`PermissionError`, saying what to change, unless `home` is a directory of this user's
    that neither group nor others may write."""
    info = home.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(
            f"the dev home {home} belongs to uid {info.st_uid}, not to you; choose another --home"
        )
    if info.st_mode & 0o022:
        raise PermissionError(
            f"the dev home {home} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}): run `chmod go-w {home}` "
            "or choose another --home"
        )


def write_client_file(
    home: Path,
    settings: Settings,
    node_id: str,
    gateway_url: str | None = None,
    gateway_api_key: str | None = None,
) -> Path:
    """Tell client commands how to reach the dev network whose home is `home`.

    Written by `write_atomically` (a fresh `O_EXCL|O_NOFOLLOW` temp file renamed over
    `client.json`: a link planted there is never followed)."""
    check_home(home)
    path = home / CLIENT_FILE
    body: dict[str, Any] = {
        "network": "dev",
        "nats_url": settings.nats_url,
        "authority_keys": list(settings.authority_keys),
        "node_id": node_id,
        "key_file": str(settings.key_file),
        "subject_prefix": settings.subject_prefix,
    }
    for name in ("nats_nkey_seed_file", "nats_ca", "gateway_api_keys_file"):
        value = getattr(settings, name)
        if value is not None:
            body[name] = str(value)
    if gateway_url is not None:
        body["gateway_url"] = gateway_url
    if gateway_api_key is not None:
        body["gateway_api_key"] = gateway_api_key
    write_atomically(path, (json.dumps(body, indent=2) + "\n").encode(), durable=False)
    log.info("dev_client_file_written path=%s", path)
    return path


def remove_client_file(home: Path) -> None:
    (home / CLIENT_FILE).unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("dev_client_file_unreadable path=%s error=%s", path, exc)
        return None
    return body if isinstance(body, dict) else None


def client_settings() -> ClientNetwork:
    """The settings of a client command: the environment's, completed by a running dev
    network's `client.json` when `RESULTITY_NATS_URL` does not name another network."""
    if "RESULTITY_NATS_URL" not in os.environ:
        path = dev_home() / CLIENT_FILE
        body = _read(path)
        if body is not None:
            given = {
                name: body[name]
                for name in SHARED_SETTINGS
                if name in body and f"RESULTITY_{name.upper()}" not in os.environ
            }
            node_id = body.get("node_id")
            return ClientNetwork(
                Settings(**given), path, node_id if isinstance(node_id, str) else None
            )
    return ClientNetwork(Settings(), None, None)
