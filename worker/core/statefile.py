"""Small state files written whole or not at all, never through a link planted beside them.

The file is written to a fresh temp file in the same folder (`O_EXCL|O_NOFOLLOW`: a link
or file already there under that name is refused, never followed or truncated), synced,
and renamed over the target (a rename replaces a link, never its target); with `durable`
the folder is synced too, so the rename survives a power cut.
"""

import os
import secrets
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> Path:
    """Replace `path` with `data` in one rename; `path` once done."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, _FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path
