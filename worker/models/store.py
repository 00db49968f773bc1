"""The verified model cache: download, check, keep, materialise and prune approved models.

Cache layout under `cache_dir`:

    blobs/<sha256>            verified model bytes (a plain file or a tar archive)
    tmp/<sha256>.<n>.part     a download in progress; never read as a model
    models/<sha256>.<n>/      a directory prepared for one runtime start (mounted at /model)

A blob gets its content-addressed name only after its size and SHA-256 matched while it was
being written; anything that fails is deleted. Because the cache lives on the operator's
disk, `prepare` hashes the blob again before every runtime start, in the same pass that
extracts it. Blocking file I/O and hashing run in worker threads.
"""

import asyncio
import copy
import hashlib
import http.client
import logging
import os
import shutil
import ssl
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO
from urllib.parse import urljoin, urlsplit

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from schemas.snapshot import ModelSpec
from worker.core.errors import ModelInvalid, ModelUnavailable
from worker.models import objectstore

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
MAX_REDIRECTS = 5
PLAIN_FILE_NAME = "model.bin"
KEEP_PREPARED = 2  # the directory a running runtime may still mount, and the new one

Progress = Callable[[int], None]


class _Transient(Exception):
    """A failure worth retrying: connection lost, server error, stalled stream."""


class _Download:
    """A `.part` file being written, with its SHA-256 and size checked on the fly.

    Not thread-safe; one thread writes at a time (the event loop hands batches over).
    """

    def __init__(self, spec: ModelSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self.written = 0
        self._hash = hashlib.sha256()
        self._file: IO[bytes] = path.open("wb")

    def reset(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.written = 0
        self._hash = hashlib.sha256()

    def write(self, chunks: list[bytes]) -> None:
        for data in chunks:
            self.written += len(data)
            if self.written > self.spec.size:
                raise ModelInvalid(
                    f"model {self.spec.id} {self.spec.version}: size mismatch: expected "
                    f"{self.spec.size} bytes, got more than that"
                )
            self._hash.update(data)
            self._file.write(data)

    def finish(self, dest: Path) -> None:
        """Check size and hash, fsync and move into place; raises `ModelInvalid`."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _check(self.spec, self.written, self._hash.hexdigest())
        os.chmod(self.path, 0o644)
        os.replace(self.path, dest)
        _fsync_dir(dest.parent)

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _check(spec: ModelSpec, size: int, sha256: str) -> None:
    what = f"model {spec.id} {spec.version}"
    if size != spec.size:
        raise ModelInvalid(f"{what}: size mismatch: expected {spec.size} bytes, got {size}")
    if sha256 != spec.sha256:
        raise ModelInvalid(f"{what}: SHA-256 mismatch: expected {spec.sha256}, got {sha256}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Fetches models named by a snapshot into a content-addressed cache.

    `js` is needed for `nats-object://` sources; `ssl_context` overrides certificate
    verification for `https://` sources (tests pass one trusting their own CA).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        js: JetStreamContext | None = None,
        ssl_context: ssl.SSLContext | None = None,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.cache_dir = cache_dir
        self._js = js
        self._ssl = ssl_context or ssl.create_default_context()
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._idle_timeout_s = idle_timeout_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._counter = 0
        self._blobs = cache_dir / "blobs"
        self._tmp = cache_dir / "tmp"
        self._models = cache_dir / "models"
        for d in (self._blobs, self._tmp, self._models):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256

    def cached(self) -> set[str]:
        """SHA-256s of the blobs in the cache (verified when written, not since)."""
        return {p.name for p in self._blobs.iterdir() if p.is_file()}

    def _lock(self, sha256: str) -> asyncio.Lock:
        return self._locks.setdefault(sha256, asyncio.Lock())

    def _next(self) -> int:
        self._counter += 1
        return time.time_ns() + self._counter

    async def fetch(self, spec: ModelSpec, *, progress: Progress | None = None) -> Path:
        """The blob for `spec`, downloading and verifying it if it is not cached.

        Raises `ModelInvalid` when the bytes or size do not match (never retried) and
        `ModelUnavailable` when the source is missing or keeps failing.
        """
        async with self._lock(spec.sha256):
            blob = self.blob_path(spec.sha256)
            try:
                if blob.stat().st_size == spec.size:
                    return blob
                log.warning("model_cache_size_mismatch model=%s sha256=%s", spec.id, spec.sha256)
                blob.unlink()
            except FileNotFoundError:
                pass
            started = time.monotonic()
            part = self._tmp / f"{spec.sha256}.{self._next()}.part"
            dl = await asyncio.to_thread(_Download, spec, part)
            try:
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(self._attempts),
                    wait=wait_exponential(multiplier=self._backoff_s, max=self._max_backoff_s),
                    retry=retry_if_exception_type(_Transient),
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        n = attempt.retry_state.attempt_number
                        if n > 1:
                            log.info("model_fetch_retry model=%s attempt=%d", spec.id, n)
                        await self._download(spec, dl, progress)
                await asyncio.to_thread(dl.finish, blob)
            except _Transient as exc:
                await asyncio.to_thread(dl.discard)
                raise ModelUnavailable(
                    f"model {spec.id} {spec.version}: {spec.source} failed after "
                    f"{self._attempts} attempts: {exc}"
                ) from exc
            except BaseException:
                await asyncio.to_thread(dl.discard)
                raise
            elapsed = time.monotonic() - started
            log.info(
                "model_fetched model=%s version=%s size=%d seconds=%.2f mb_per_s=%.1f",
                spec.id,
                spec.version,
                spec.size,
                elapsed,
                spec.size / 1e6 / max(elapsed, 1e-9),
            )
            return blob

    async def _download(self, spec: ModelSpec, dl: _Download, progress: Progress | None) -> None:
        if spec.source.startswith("nats-object://"):
            await self._download_object(spec, dl, progress)
        elif spec.source.startswith("https://"):
            await asyncio.to_thread(
                _download_https, spec.source, dl, self._ssl, self._idle_timeout_s, progress
            )
        else:
            raise ModelUnavailable(f"model {spec.id}: unsupported source {spec.source!r}")

    async def _download_object(
        self, spec: ModelSpec, dl: _Download, progress: Progress | None
    ) -> None:
        if self._js is None:
            raise ModelUnavailable(f"model {spec.id}: {spec.source} needs a NATS connection")
        bucket, _, name = spec.source.removeprefix("nats-object://").partition("/")
        await asyncio.to_thread(dl.reset)
        try:
            info = await objectstore.get_info(self._js, bucket, name)
            if info.size is not None and info.size != spec.size:
                raise ModelInvalid(
                    f"model {spec.id} {spec.version}: size mismatch: expected {spec.size} "
                    f"bytes, the object {spec.source} has {info.size}"
                )
            digest = objectstore.digest_hex(info)
            if digest is not None and digest != spec.sha256:
                raise ModelInvalid(
                    f"model {spec.id} {spec.version}: SHA-256 mismatch: expected "
                    f"{spec.sha256}, the object {spec.source} has {digest}"
                )
            await objectstore.read_chunks(
                self._js, info, dl.write, idle_timeout_s=self._idle_timeout_s, progress=progress
            )
        except objectstore.ObjectMissing as exc:
            raise ModelUnavailable(f"model {spec.id}: {exc}") from exc
        except (objectstore.ObjectReadError, NatsError, OSError) as exc:
            raise _Transient(str(exc) or type(exc).__name__) from exc

    async def prepare(self, spec: ModelSpec) -> Path:
        """A fresh directory holding the model, to mount read-only at /model.

        The blob is hashed again in the same pass that extracts a tar archive (or that
        checks a plain file, placed as `model.bin`). A blob that no longer matches is
        deleted with the directory and `ModelInvalid` is raised.
        """
        blob = await self.fetch(spec)
        async with self._lock(spec.sha256):
            dest = self._models / f"{spec.sha256}.{self._next()}"
            try:
                kind = await asyncio.to_thread(_materialise, spec, blob, dest)
            except ModelInvalid:
                await asyncio.to_thread(_remove_quietly, dest)
                await asyncio.to_thread(blob.unlink, True)
                log.error("model_cache_corrupt model=%s sha256=%s", spec.id, spec.sha256)
                raise
            except BaseException:
                await asyncio.to_thread(_remove_quietly, dest)
                raise
            await asyncio.to_thread(self._drop_old_prepared, spec.sha256)
        log.info("model_prepared model=%s kind=%s dir=%s", spec.id, kind, dest)
        return dest

    def _drop_old_prepared(self, sha256: str) -> None:
        dirs = sorted(
            self._models.glob(f"{sha256}.*"), key=lambda p: int(p.name.rpartition(".")[2])
        )
        for old in dirs[:-KEEP_PREPARED]:
            _remove_quietly(old)

    async def prune(self, approved_sha256s: Iterable[str]) -> list[str]:
        """Delete every cached model not in `approved_sha256s`; returns the removed SHA-256s."""
        approved = set(approved_sha256s)
        return await asyncio.to_thread(self._prune_sync, approved)

    def _prune_sync(self, approved: set[str]) -> list[str]:
        removed: set[str] = set()
        for blob in self._blobs.iterdir():
            if blob.name not in approved:
                _remove_quietly(blob)
                removed.add(blob.name)
        for d in self._models.iterdir():
            sha = d.name.partition(".")[0]
            if sha not in approved:
                _remove_quietly(d)
                removed.add(sha)
        for part in self._tmp.iterdir():
            sha = part.name.partition(".")[0]
            if sha not in approved and not self._lock(sha).locked():
                _remove_quietly(part)
        for sha in sorted(removed):
            log.info("model_removed sha256=%s", sha)
        return sorted(removed)


def _remove_quietly(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _download_https(
    url: str, dl: _Download, context: ssl.SSLContext, timeout: float, progress: Progress | None
) -> None:
    """One attempt at `url`, resuming from `dl.written` with a Range request if possible."""
    spec = dl.spec
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ModelUnavailable(f"model {spec.id}: refusing non-https URL {url!r}")
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context
        )
        responses: list[http.client.HTTPResponse] = []
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            headers = {"User-Agent": "resultity-node", "Accept-Encoding": "identity"}
            if dl.written:
                headers["Range"] = f"bytes={dl.written}-"
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            responses.append(resp)
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise ModelUnavailable(f"model {spec.id}: redirect without Location")
                url = urljoin(url, location)
                continue
            if resp.status == 206 and dl.written:
                start = _range_start(resp.getheader("Content-Range"))
                if start != dl.written:
                    dl.reset()
                    raise _Transient(f"server resumed at byte {start}, wanted {dl.written}")
                log.info("model_fetch_resumed model=%s offset=%d", spec.id, dl.written)
            elif resp.status == 200:
                if dl.written:
                    log.info("model_fetch_restarted model=%s reason=no_range_support", spec.id)
                    dl.reset()
            elif resp.status in (408, 429) or resp.status >= 500:
                raise _Transient(f"HTTP {resp.status} from {parts.hostname}")
            else:
                raise ModelUnavailable(
                    f"model {spec.id} {spec.version}: HTTP {resp.status} {resp.reason} "
                    f"for {spec.source}"
                )
            while True:
                data = resp.read(READ_SIZE)
                if not data:
                    break
                dl.write([data])
                if progress is not None:
                    progress(dl.written)
            if resp.length:  # http.client reads short, without raising, when the peer closes
                raise _Transient(f"connection ended with {resp.length} bytes of the body unread")
            return
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        finally:
            for resp in responses:
                resp.close()
            conn.close()
    raise ModelUnavailable(f"model {spec.id}: more than {MAX_REDIRECTS} redirects")


def _range_start(content_range: str | None) -> int:
    # "bytes 100-199/200"
    try:
        assert content_range is not None
        return int(content_range.split()[1].split("-")[0])
    except (AssertionError, IndexError, ValueError):
        return -1


class _HashingReader:
    """A read-only stream over a file that hashes and counts every byte it hands out."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass


def _looks_like_tar(head: bytes) -> bool:
    if head[257:262] == b"ustar":
        return True
    if head[:2] == b"\x1f\x8b":
        try:
            inner = zlib.decompressobj(wbits=31).decompress(head, 512)
        except zlib.error:
            return False
        return inner[257:262] == b"ustar"
    return False


# tarfile's extraction filters came in 3.11.4; Debian bookworm's python3 is 3.11.2.
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
_FilterError: type[tarfile.TarError] = getattr(tarfile, "FilterError", tarfile.TarError)


def _data_filter_compat(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """What the "data" filter refuses, for Pythons without it: special files, and links
    that leave `dest`; owners are not applied (extraction skips attributes)."""
    if member.isdev():
        raise _FilterError(f"member {member.name!r} is a device or fifo")
    if member.issym() or member.islnk():
        root = os.path.realpath(dest)
        base = root if member.islnk() else os.path.join(root, os.path.dirname(member.name))
        target = os.path.realpath(os.path.join(base, member.linkname))
        if member.linkname.startswith("/") or os.path.commonpath([root, target]) != root:
            raise _FilterError(f"link {member.name!r} points outside the model directory")
    return copy.copy(member)


def _tar_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # An archive that names an absolute path or ".." was made to escape: refuse it whole
    # (tarfile's "data" filter would strip the leading "/"). The filter then refuses links
    # leaving `dest` and device files; the runtime user must be able to read the rest.
    if member.name.startswith("/") or ".." in member.name.split("/"):
        raise _FilterError(f"member {member.name!r} points outside the model directory")
    if not _HAS_DATA_FILTER:
        safe = _data_filter_compat(member, dest)
        safe.mode = 0o755 if safe.isdir() or (safe.mode or 0) & 0o111 else 0o644
        return safe
    safe = tarfile.data_filter(member, dest)
    mode = 0o755 if safe.isdir() or (safe.mode or 0) & 0o111 else 0o644
    return safe.replace(mode=mode, deep=False)


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    if _HAS_DATA_FILTER:
        tar.extractall(dest, filter=_tar_filter)
        return
    for member in tar:
        safe = _tar_filter(member, str(dest))
        tar.extract(safe, dest, set_attrs=False)
        if not safe.issym():
            os.chmod(dest / safe.name, safe.mode)


def _materialise(spec: ModelSpec, blob: Path, dest: Path) -> str:
    dest.mkdir(mode=0o755)
    with blob.open("rb") as f:
        head = f.read(512)
        f.seek(0)
        reader = _HashingReader(f)
        if _looks_like_tar(head):
            kind = "tar"
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
                    _extract(tar, dest)
            except (tarfile.TarError, EOFError, zlib.error) as exc:
                reader.drain()
                try:
                    _check(spec, reader.size, reader.hash.hexdigest())
                except ModelInvalid as bad:
                    raise bad from exc
                raise ModelInvalid(
                    f"model {spec.id} {spec.version}: unsafe or broken archive: {exc}"
                ) from exc
        else:
            kind = "file"
            target = dest / PLAIN_FILE_NAME
            try:
                os.link(blob, target)
            except OSError:
                shutil.copyfile(blob, target)
                os.chmod(target, 0o644)
        reader.drain()
    _check(spec, reader.size, reader.hash.hexdigest())
    return kind
