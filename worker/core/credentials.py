"""How a participant proves who it is to NATS, and checks that it talks to the network's
servers: nats-py's own options, filled from settings.

- `RESULTITY_NATS_CREDS`: a `.creds` file (user JWT and nkey seed; decentralized accounts),
  passed as nats-py's `user_credentials`; or `RESULTITY_NATS_NKEY_SEED_FILE`: a file holding
  an nkey user seed, passed as `nkeys_seed` (the servers list the public key with its role's
  permissions, see `worker.core.roles`).
- `RESULTITY_NATS_CA`: the CA the servers' TLS certificates chain to; pinned, the system
  trust store is not used.

The seed never appears in a log line or an error; files are created with mode 0600.
"""

import logging
import os
import ssl
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nkeys

from worker.core.errors import KeyFileError, NodeError
from worker.core.settings import Settings


def nats_urls(settings: Settings) -> list[str]:
    return [u.strip() for u in settings.nats_url.split(",") if u.strip()]


class _TlsEofNoise(logging.Filter):
    """nats-py's protocol answers `eof_received` with True, which asyncio's TLS transport
    ignores and warns about at every connection close: noise, not an event."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received" not in record.getMessage()


def tls_context(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts only `ca` (and checks the server's name)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _TlsEofNoise) for f in asyncio_log.filters):
        asyncio_log.addFilter(_TlsEofNoise())
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def connect_options(settings: Settings) -> dict[str, Any]:
    """The `nats.connect` keyword arguments for this participant's credentials and TLS."""
    options: dict[str, Any] = {}
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    elif settings.nats_nkey_seed_file is not None:
        check_secret_file(settings.nats_nkey_seed_file)
        options["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    if settings.nats_ca is not None:
        options["tls"] = tls_context(settings.nats_ca)
    return options


def require_tls(settings: Settings) -> None:
    """Refuse a plaintext URL (`nats://`) unless `RESULTITY_NATS_INSECURE` allows it: a
    node's jobs, results and credentials must not cross a network in the clear."""
    if settings.nats_insecure:
        return
    plain = [u for u in nats_urls(settings) if urlsplit(u).scheme != "tls"]
    if plain:
        raise NodeError(
            f"refusing the plaintext NATS URL {plain[0]}: use tls:// with RESULTITY_NATS_CA, "
            "or set RESULTITY_NATS_INSECURE=1 (development on this machine only)"
        )


def check_secret_file(path: Path) -> None:
    """A credentials file must be a regular file that group and others cannot read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyFileError(f"NATS credentials file {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"NATS credentials file {path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"NATS credentials file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run 'chmod 600 {path}'"
        )


def write_secret(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 (never following a link, never overwriting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def new_user_seed(path: Path) -> str:
    """Write a new nkey user seed to `path` (0600); return its public key (`U...`)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    write_secret(path, bytes(seed) + b"\n")
    return user_public_key(path)


def user_public_key(path: Path) -> str:
    """The public key (`U...`) of the nkey user seed in `path`."""
    check_secret_file(path)
    pair = nkeys.from_seed(bytearray(path.read_bytes().strip()))
    try:
        public: bytes = pair.public_key
        return public.decode()
    finally:
        pair.wipe()
