"""The verified model cache: download, check, keep, materialise and prune approved models.

Cache layout under `cache_dir`:

    blobs/<sha256>            verified model bytes (a plain file or a tar archive)
    tmp/<sha256>.<n>.part     a download in progress; never read as a model
    models/<sha256>.<n>/      a directory prepared for one runtime start (mounted at /model)

A blob gets its content-addressed name only after its size and SHA-256 matched while it was
being written; anything that fails is deleted. Because the cache lives on the operator's
disk, `prepare` hashes the blob again before every runtime start, and only then unpacks it
(see `_unpack` for what an archive may hold). A download has an overall deadline from its
size and a minimum rate, and starts only with room on disk for it. Blocking file I/O and
hashing run in worker threads; cancelling `fetch` or `prepare` stops the thread and
removes what it wrote.
"""

import asyncio
import errno
import functools
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import socket
import ssl
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import IO, TypeVar
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
from worker.core.settings import Settings
from worker.models import objectstore

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
MAX_REDIRECTS = 5
PLAIN_FILE_NAME = "model.bin"
KEEP_PREPARED = 2  # the directory a running runtime may still mount, and the new one
GZIP_MAGIC = b"\x1f\x8b"
UNPACK_FLOOR = 16 << 20  # a tiny archive of text may expand more than the ratio allows
TAR_OVERHEAD_PER_ENTRY = 4096  # header, long-name and pax blocks, padding
DISK_RESERVE = 64 << 20  # free space left after a download, for logs and state
MAX_HEADER_BYTES = 64 << 10  # a pax or GNU long-name header (tarfile reads it into memory)
MAX_DEPTH = 32  # directories in one member's name

Progress = Callable[[int], None]
T = TypeVar("T")


@dataclass(frozen=True)
class ModelLimits:
    """What one model may cost the node (defaults: those of `Settings`)."""

    unpack_ratio: float = 4.0
    """An archive may unpack to this many times its size (at least `UNPACK_FLOOR`)."""
    max_entries: int = 10_000
    fetch_min_bytes_per_s: float = 1_000_000.0
    fetch_grace_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelLimits":
        return cls(
            unpack_ratio=settings.model_unpack_ratio,
            max_entries=settings.model_max_entries,
            fetch_min_bytes_per_s=settings.model_fetch_min_bytes_per_s,
            fetch_grace_s=settings.model_fetch_grace_s,
        )

    def max_unpacked(self, size: int) -> int:
        return max(int(size * self.unpack_ratio), UNPACK_FLOOR)

    def fetch_deadline_s(self, size: int) -> float:
        """All attempts at a download of `size` bytes together end by then."""
        return self.fetch_grace_s + size / self.fetch_min_bytes_per_s


def _nothing() -> None:
    """For a thread that ends soon by itself: cancellation just waits for it."""


async def _in_thread(fn: Callable[[], T], abort: Callable[[], None]) -> T:
    """`fn()` in a worker thread; when the caller is cancelled, `abort()` makes the thread
    stop early and the cancellation waits for it, so nothing writes after cleanup."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        abort()
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: the thread's way out after `abort` is of no interest
        raise


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
        self._aborted = Event()
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket | None) -> None:
        """The socket an https attempt reads from, to shut down on `abort`."""
        self._sock = sock
        if self._aborted.is_set():
            self._shut()

    def abort(self) -> None:
        """From any thread: make the thread writing this download stop at once."""
        self._aborted.set()
        self._shut()

    def _shut(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.written = 0
        self._hash = hashlib.sha256()

    def write(self, chunks: list[bytes]) -> None:
        if self._aborted.is_set():
            raise _Aborted
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
        limits: ModelLimits | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self._js = js
        self._ssl = ssl_context or ssl.create_default_context()
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._idle_timeout_s = idle_timeout_s
        self._limits = limits or ModelLimits()
        self._locks: dict[str, asyncio.Lock] = {}
        self._unsafe: dict[str, str] = {}
        """SHA-256s of archives that matched their hash but are unsafe, with the reason:
        not fetched or unpacked again until a prune forgets them."""
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

    def cached_bytes(self) -> int:
        """Bytes of the blobs in the cache."""
        return sum(p.stat().st_size for p in self._blobs.iterdir() if p.is_file())

    async def touch(self, sha256: str) -> None:
        """Mark the model as served now (eviction takes the least recently served first)."""
        blob = self.blob_path(sha256)
        try:
            await asyncio.to_thread(os.utime, blob)
        except FileNotFoundError:
            pass

    async def evict(self, keep: Iterable[str], budget_bytes: int) -> list[str]:
        """Delete cached models not in `keep`, least recently served first, until the blobs
        fit in `budget_bytes`; returns the removed SHA-256s."""
        return await asyncio.to_thread(self._evict_sync, set(keep), budget_bytes)

    def _evict_sync(self, keep: set[str], budget_bytes: int) -> list[str]:
        blobs = [p for p in self._blobs.iterdir() if p.is_file()]
        total = sum(p.stat().st_size for p in blobs)
        removed: list[str] = []
        for blob in sorted(blobs, key=lambda p: p.stat().st_mtime):
            if total <= budget_bytes:
                break
            if blob.name in keep or self._lock(blob.name).locked():
                continue
            total -= blob.stat().st_size
            _remove_quietly(blob)
            for d in self._models.glob(f"{blob.name}.*"):
                _remove_quietly(d)
            removed.append(blob.name)
        return removed

    def _lock(self, sha256: str) -> asyncio.Lock:
        return self._locks.setdefault(sha256, asyncio.Lock())

    def _next(self) -> int:
        self._counter += 1
        return time.time_ns() + self._counter

    def _check_known_unsafe(self, spec: ModelSpec) -> None:
        reason = self._unsafe.get(spec.sha256)
        if reason is not None:
            raise ModelInvalid(reason)

    def _check_disk(self, spec: ModelSpec) -> None:
        free = shutil.disk_usage(self._tmp).free
        if free < spec.size + DISK_RESERVE:
            raise ModelUnavailable(
                f"model {spec.id} {spec.version}: not enough disk space in {self.cache_dir} "
                f"for {spec.size} bytes (+{DISK_RESERVE} spare): {free} free"
            )

    async def fetch(self, spec: ModelSpec, *, progress: Progress | None = None) -> Path:
        """The blob for `spec`, downloading and verifying it if it is not cached.

        Raises `ModelInvalid` when the bytes or size do not match, or the archive was
        found unsafe before (never retried), and `ModelUnavailable` when the source is
        missing or keeps failing, the disk has no room for it, or all attempts together
        pass the deadline from its size. Cancellation removes the partial file.
        """
        async with self._lock(spec.sha256):
            self._check_known_unsafe(spec)
            blob = self.blob_path(spec.sha256)
            try:
                if blob.stat().st_size == spec.size:
                    return blob
                log.warning("model_cache_size_mismatch model=%s sha256=%s", spec.id, spec.sha256)
                blob.unlink()
            except FileNotFoundError:
                pass
            self._check_disk(spec)
            started = time.monotonic()
            deadline_s = self._limits.fetch_deadline_s(spec.size)
            part = self._tmp / f"{spec.sha256}.{self._next()}.part"
            try:
                dl = await _in_thread(functools.partial(_Download, spec, part), _nothing)
            except asyncio.CancelledError:
                part.unlink(missing_ok=True)
                raise
            try:
                async with asyncio.timeout(deadline_s) as deadline:
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
                await _in_thread(functools.partial(dl.finish, blob), _nothing)
            except _Transient as exc:
                await asyncio.to_thread(dl.discard)
                raise ModelUnavailable(
                    f"model {spec.id} {spec.version}: {spec.source} failed after "
                    f"{self._attempts} attempts: {exc}"
                ) from exc
            except TimeoutError as exc:
                await asyncio.to_thread(dl.discard)
                if not deadline.expired():
                    raise
                raise ModelUnavailable(
                    f"model {spec.id} {spec.version}: {spec.source} not fetched within "
                    f"{deadline_s:.0f}s ({dl.written} of {spec.size} bytes; the deadline "
                    f"allows {self._limits.fetch_min_bytes_per_s:g} bytes/s)"
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
            await _in_thread(
                functools.partial(
                    _download_https, spec.source, dl, self._ssl, self._idle_timeout_s, progress
                ),
                dl.abort,
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

        The blob is hashed again first; only a blob that matches is unpacked (a tar
        archive) or linked as `model.bin` (a plain file). A blob that no longer matches is
        deleted; an archive that is unsafe is kept, remembered and refused at once from
        then on (until `prune` drops it). Both raise `ModelInvalid`.
        """
        blob = await self.fetch(spec)
        async with self._lock(spec.sha256):
            self._check_known_unsafe(spec)
            dest = self._models / f"{spec.sha256}.{self._next()}"
            abort = Event()
            try:
                kind = await _in_thread(
                    functools.partial(_materialise, spec, blob, dest, self._limits, abort),
                    abort.set,
                )
            except _Unsafe as exc:
                await asyncio.to_thread(_remove_quietly, dest)
                reason = f"model {spec.id} {spec.version}: unsafe archive: {exc}"
                self._unsafe[spec.sha256] = reason
                log.error(
                    "model_archive_unsafe model=%s sha256=%s reason=%s", spec.id, spec.sha256, exc
                )
                raise ModelInvalid(reason) from exc
            except ModelInvalid:
                await asyncio.to_thread(_remove_quietly, dest)
                await asyncio.to_thread(blob.unlink, True)
                log.error("model_cache_corrupt model=%s sha256=%s", spec.id, spec.sha256)
                raise
            except OSError as exc:
                await asyncio.to_thread(_remove_quietly, dest)
                raise ModelUnavailable(
                    f"model {spec.id} {spec.version}: could not prepare {dest}: {exc}"
                ) from exc
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
        for sha in set(self._unsafe) - approved:
            del self._unsafe[sha]
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
            dl.attach(conn.sock)
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
            dl.attach(None)
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


def _looks_like_tar(head: bytes) -> bool:
    if head[257:262] == b"ustar":
        return True
    if head[:2] == GZIP_MAGIC:
        try:
            inner = zlib.decompressobj(wbits=31).decompress(head, 512)
        except zlib.error:
            return False
        return inner[257:262] == b"ustar"
    return False


class _Unsafe(Exception):
    """An archive whose bytes match its hash but which the node will not unpack."""


class _Aborted(Exception):
    """The coroutine waiting on a worker thread was cancelled; the thread stops early."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_KINDS = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hardlink",
    tarfile.CHRTYPE: "a device",
    tarfile.BLKTYPE: "a device",
    tarfile.FIFOTYPE: "a fifo",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
# errnos that only a hostile or broken archive causes while unpacking into a fresh
# directory: a name twice, a file where a directory goes, a name too long.
_ARCHIVE_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG}


def _parts(name: str) -> tuple[str, ...]:
    if "\x00" in name:  # a pax name may hold one; `os.open` would raise a plain ValueError
        raise _Unsafe(f"member {name!r:.200} has a NUL byte in its name")
    if name.startswith("/"):
        raise _Unsafe(f"member {name!r:.200} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Unsafe(f"member {name!r:.200} climbs out with '..'")
    if len(parts) > MAX_DEPTH:
        raise _Unsafe(f"member {name!r:.200} is more than {MAX_DEPTH} directories deep")
    return parts


_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax or GNU long-name header over `MAX_HEADER_BYTES` before tarfile reads
    it whole into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise _Unsafe(f"a {self.size}-byte extended header (at most {MAX_HEADER_BYTES})")
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member


class _Tree:
    """Directories under one root, each opened through its parent's descriptor with
    `O_NOFOLLOW`: whatever the archive names, no write can leave the root. Keeps the
    last directory used open (archives list a directory's files together)."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._last: tuple[tuple[str, ...], int] | None = None

    def dir(self, parts: tuple[str, ...]) -> int:
        if not parts:
            return self._root
        if self._last is not None and self._last[0] == parts:
            return self._last[1]
        fd = self._root
        try:
            for part in parts:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, 0o755)
                if fd != self._root:
                    os.close(fd)
                fd = child
        except BaseException:
            if fd != self._root:
                os.close(fd)
            raise
        self.close()
        self._last = (parts, fd)
        return fd

    def close(self) -> None:
        if self._last is not None:
            os.close(self._last[1])
            self._last = None


class _CappedReader:
    """Hands out at most `limit` bytes of `f`; an archive that needs more is unsafe."""

    def __init__(self, f: IO[bytes] | gzip.GzipFile, limit: int) -> None:
        self._f = f
        self._limit = limit
        self._count = 0

    def read(self, n: int = -1) -> bytes:
        room = self._limit - self._count + 1
        data = self._f.read(room if n < 0 else min(n, room))
        self._count += len(data)
        if self._count > self._limit:
            raise _Unsafe(f"the tar stream is longer than {self._limit} bytes")
        return data


def _write_member(src: IO[bytes], parent: int, name: str, mode: int, abort: Event) -> None:
    fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        while data := src.read(READ_SIZE):
            if abort.is_set():
                raise _Aborted
            out.write(data)
        os.fchmod(out.fileno(), mode)


def _unpack(
    f: IO[bytes], gz: bool, dest_fd: int, limits: "ModelLimits", size: int, abort: Event
) -> None:
    """Unpack the tar (or tar.gz) `f` into the directory `dest_fd`.

    Only directories and regular files are written, each through a descriptor opened
    under `dest_fd` (never a path), files with `O_EXCL`; modes are 0755 or 0644.
    Links, devices, fifos, sparse and unknown entries, names with `..` or a leading `/`,
    a name twice, more than `limits.max_entries` entries or more than
    `limits.max_unpacked(size)` bytes: `_Unsafe`.
    """
    max_bytes = limits.max_unpacked(size)
    stream: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
    capped = _CappedReader(stream, max_bytes + (limits.max_entries + 1) * TAR_OVERHEAD_PER_ENTRY)
    tree = _Tree(dest_fd)
    total = entries = 0
    try:
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=capped, mode="r|", bufsize=READ_SIZE, tarinfo=_BoundedTarInfo
        ) as tar:
            for member in tar:
                if abort.is_set():
                    raise _Aborted
                entries += 1
                if entries > limits.max_entries:
                    raise _Unsafe(f"the archive has more than {limits.max_entries} entries")
                parts = _parts(member.name)
                if member.type == tarfile.DIRTYPE:
                    tree.dir(parts)
                    continue
                if member.type not in _FILE_TYPES or member.sparse is not None:
                    kind = _KINDS.get(member.type, f"an entry of type {member.type!r}")
                    raise _Unsafe(f"member {member.name!r} is {kind}")
                if not parts:
                    raise _Unsafe("a file member has no name")
                total += member.size
                if total > max_bytes:
                    raise _Unsafe(
                        f"the archive unpacks to more than {max_bytes} bytes "
                        f"({limits.unpack_ratio:g}x its size of {size})"
                    )
                src = tar.extractfile(member)
                assert src is not None
                mode = 0o755 if member.mode & 0o111 else 0o644
                _write_member(src, tree.dir(parts[:-1]), parts[-1], mode, abort)
    except OSError as exc:
        if exc.errno in _ARCHIVE_ERRNOS:
            raise _Unsafe(f"{exc.strerror}: {exc.filename!r}") from exc
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _Unsafe(f"broken archive: {exc}") from exc
    finally:
        tree.close()


def _place_file(f: IO[bytes], dest_fd: int) -> None:
    """The plain-file model as `model.bin`: a hard link to the very inode that was hashed
    (through /proc), or a copy from the open descriptor."""
    try:
        os.link(f"/proc/self/fd/{f.fileno()}", PLAIN_FILE_NAME, dst_dir_fd=dest_fd)
        return
    except OSError:
        pass
    f.seek(0)
    fd = os.open(PLAIN_FILE_NAME, _FILE_FLAGS, 0o600, dir_fd=dest_fd)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(f, out, READ_SIZE)
        os.fchmod(out.fileno(), 0o644)


def _materialise(
    spec: ModelSpec, blob: Path, dest: Path, limits: "ModelLimits", abort: Event
) -> str:
    """Hash the blob, and only if it matches, unpack (or link) it into a new `dest`.

    The blob is opened once (`O_NOFOLLOW`); the same descriptor is hashed and then read
    for extraction, and its size and mtime must not change in between.
    """
    fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ModelInvalid(f"model {spec.id} {spec.version}: the cached blob is not a file")
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        _check(spec, f.tell(), digest)
        f.seek(0)
        head = f.read(512)
        f.seek(0)
        os.mkdir(dest, 0o755)
        dest_fd = os.open(dest, _DIR_FLAGS)
        try:
            os.fchmod(dest_fd, 0o755)
            if _looks_like_tar(head):
                kind = "tar"
                _unpack(f, head[:2] == GZIP_MAGIC, dest_fd, limits, spec.size, abort)
            else:
                kind = "file"
                _place_file(f, dest_fd)
        finally:
            os.close(dest_fd)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise ModelInvalid(
                f"model {spec.id} {spec.version}: the cached blob changed while it was unpacked"
            )
    return kind
