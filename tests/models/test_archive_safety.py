"""Hostile model archives (issue 11, items 1, 2 and 9): every one is refused, nothing is
written outside the model directory, and no cached blob is extracted before its hash
matched. The archives are placed in the cache as the operator's disk would hold them, so
no NATS is needed: `fetch` finds the blob of the right size and `prepare` does the rest."""

import asyncio
import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
from pathlib import Path
from threading import Event
from typing import Any

import pytest

from schemas.snapshot import ModelSpec
from worker.core.errors import ModelInvalid, ModelUnavailable
from worker.models import store as store_module
from worker.models.store import ModelLimits, ModelStore

pytestmark = pytest.mark.timeout(120)

LONG = "d" * 247
PATH_MAX = 4096


def spec_for(data: bytes, **over: object) -> ModelSpec:
    fields: dict[str, object] = {
        "id": "m1",
        "version": "1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "source": "nats-object://rst_models/m1",
    }
    fields.update(over)
    return ModelSpec.model_validate(fields)


def seed(store: ModelStore, data: bytes, spec: ModelSpec | None = None) -> ModelSpec:
    """Put `data` in the cache under `spec`'s hash, as a blob a previous fetch wrote."""
    spec = spec or spec_for(data)
    store.blob_path(spec.sha256).write_bytes(data)
    return spec


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=9) if gz else raw


def symlink_chain(
    store: ModelStore, climb: int
) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]:
    """The CVE-2025-4517 shape: symlinks through 247-character directory names, as many
    as fit under PATH_MAX below the extraction directory, so that `realpath` gives up
    resolving the next name; then a link whose target climbs `climb` levels above the
    extraction directory. Returns the entries and the escaping link's name."""
    # The directory `prepare` extracts into: cache/models/<sha256>.<19-digit counter>
    base = len(str(store.cache_dir / "models")) + 1 + 64 + 1 + 19
    steps = [chr(ord("a") + i) for i in range((PATH_MAX - 1 - base) // (len(LONG) + 1))]
    assert len(steps) >= 2
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    path = ""
    for step in steps:
        entries.append((entry(os.path.join(path, LONG), tarfile.DIRTYPE), None))
        entries.append((entry(os.path.join(path, step), tarfile.SYMTYPE, LONG), None))
        path = os.path.join(path, LONG)
    linkpath = os.path.join(*steps, "l" * 254)
    entries.append((entry(linkpath, tarfile.SYMTYPE, "../" * len(steps)), None))
    entries.append((entry("escape", tarfile.SYMTYPE, linkpath + "/.." * climb), None))
    return entries, "escape"


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    # cache/models/<sha>.<n>/ is three levels below tmp_path
    return ModelStore(tmp_path / "cache", attempts=1)


def assert_nothing_prepared(store: ModelStore) -> None:
    assert list((store.cache_dir / "models").iterdir()) == []


async def test_symlink_chain_cannot_write_outside(store: ModelStore, tmp_path: Path) -> None:
    entries, escape = symlink_chain(store, climb=3)
    entries.append((entry(f"{escape}/planted.txt"), b"owned"))
    spec = seed(store, make_tar(entries))
    with pytest.raises(ModelInvalid, match="unsafe archive"):
        await store.prepare(spec)
    assert not (tmp_path / "planted.txt").exists()
    assert_nothing_prepared(store)


async def test_hardlink_through_symlink_chain_cannot_touch_outside_file(
    store: ModelStore, tmp_path: Path
) -> None:
    secret = tmp_path / "node.key"
    secret.write_text("00" * 32)
    secret.chmod(0o600)
    entries, escape = symlink_chain(store, climb=3)
    entries.append((entry("stolen", tarfile.LNKTYPE, f"{escape}/node.key"), None))
    spec = seed(store, make_tar(entries))
    with pytest.raises(ModelInvalid, match="unsafe archive"):
        await store.prepare(spec)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.stat().st_nlink == 1
    assert_nothing_prepared(store)


@pytest.mark.parametrize(
    ("kind", "link"),
    [
        (tarfile.SYMTYPE, "inside.txt"),  # even a link that stays inside
        (tarfile.LNKTYPE, "inside.txt"),
        (tarfile.FIFOTYPE, ""),
        (tarfile.CHRTYPE, ""),
        (tarfile.BLKTYPE, ""),
        (tarfile.GNUTYPE_SPARSE, ""),
        (b"Z", ""),  # a type tarfile does not know, which it would write as a file
    ],
)
async def test_links_and_special_entries_are_refused(
    store: ModelStore, kind: bytes, link: str
) -> None:
    spec = seed(store, make_tar([(entry("inside.txt"), b"fine"), (entry("odd", kind, link), None)]))
    with pytest.raises(ModelInvalid, match="unsafe"):
        await store.prepare(spec)
    assert_nothing_prepared(store)


@pytest.mark.parametrize(
    "name", ["../up.txt", "/abs.txt", "a/../../up.txt", "a/./../../up.txt", "a/" * 200 + "deep"]
)
async def test_names_leaving_the_directory_are_refused(
    store: ModelStore, tmp_path: Path, name: str
) -> None:
    spec = seed(store, make_tar([(entry(name), b"x")]))
    with pytest.raises(ModelInvalid, match="unsafe"):
        await store.prepare(spec)
    assert not (store.cache_dir / "models" / "up.txt").exists()
    assert_nothing_prepared(store)


async def test_huge_extended_header_is_refused(store: ModelStore) -> None:
    """tarfile reads a pax header whole into memory: 32 MiB of it from a 40 KB archive."""
    info = entry("w.bin")
    info.pax_headers = {"comment": "x" * (32 << 20)}
    spec = seed(store, make_tar([(info, b"w")], gz=True))
    with pytest.raises(ModelInvalid, match="unsafe archive.*extended header"):
        await store.prepare(spec)
    assert_nothing_prepared(store)


async def test_a_name_twice_is_refused(store: ModelStore) -> None:
    spec = seed(store, make_tar([(entry("w.bin"), b"first"), (entry("w.bin"), b"second")]))
    with pytest.raises(ModelInvalid, match="unsafe archive"):
        await store.prepare(spec)
    assert_nothing_prepared(store)


async def test_tampered_cached_blob_is_never_extracted(store: ModelStore, tmp_path: Path) -> None:
    """A blob on disk that no longer matches its hash is refused before extraction: the
    escape it carries must not run (today's code extracted first, then hashed)."""
    honest = make_tar([(entry("config.json"), b"{}")])
    entries, escape = symlink_chain(store, climb=3)
    entries.append((entry(f"{escape}/planted.txt"), b"owned"))
    hostile = make_tar(entries)
    spec = spec_for(honest, size=len(hostile))
    seed(store, hostile, spec)
    with pytest.raises(ModelInvalid, match="SHA-256 mismatch"):
        await store.prepare(spec)
    assert not (tmp_path / "planted.txt").exists()
    assert not store.blob_path(spec.sha256).exists()
    assert_nothing_prepared(store)


async def test_archive_expanding_past_the_cap_is_refused(store: ModelStore) -> None:
    # 64 MiB of zeros in a ~65 KB archive: far over the default 4x the archive size.
    data = make_tar([(entry("weights.bin"), bytes(64 << 20))], gz=True)
    assert len(data) < 1 << 20
    spec = seed(store, data)
    with pytest.raises(ModelInvalid, match="unsafe archive.*more than"):
        await store.prepare(spec)
    assert_nothing_prepared(store)


async def test_archive_with_too_many_entries_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", attempts=1, limits=ModelLimits(max_entries=500))
    data = make_tar([(entry(f"f{i}"), b"") for i in range(501)], gz=True)
    spec = seed(store, data)
    with pytest.raises(ModelInvalid, match="unsafe archive.*more than 500 entries"):
        await store.prepare(spec)
    assert_nothing_prepared(store)


async def test_default_entry_cap_refuses_twenty_thousand_files(store: ModelStore) -> None:
    data = make_tar([(entry(f"d{i // 1000}/f{i}"), b"") for i in range(20_002)], gz=True)
    spec = seed(store, data)
    with pytest.raises(ModelInvalid, match="unsafe archive.*entries"):
        await store.prepare(spec)
    assert_nothing_prepared(store)


async def test_safe_archive_extracts_with_plain_modes(store: ModelStore) -> None:
    exe = entry("model/run.sh")
    exe.mode = 0o4777  # setuid and world-writable in the archive: neither survives
    data = make_tar(
        [
            (entry("model", tarfile.DIRTYPE), None),
            (entry("model/config.json"), b'{"a": 1}'),
            (exe, b"#!/bin/sh\n"),
            (entry("model/sub/deep/weights.bin"), b"w" * 10_000),
            (entry("./model/tokenizer.json"), b"{}"),
        ],
        gz=True,
    )
    spec = seed(store, data)
    model_dir = await store.prepare(spec)
    assert (model_dir / "model" / "config.json").read_bytes() == b'{"a": 1}'
    assert (model_dir / "model" / "sub" / "deep" / "weights.bin").stat().st_size == 10_000
    assert (model_dir / "model" / "tokenizer.json").read_bytes() == b"{}"
    assert stat.S_IMODE((model_dir / "model" / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((model_dir / "model" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((model_dir / "model" / "sub").stat().st_mode) == 0o755


async def test_unsafe_archive_is_remembered_and_its_blob_kept(
    store: ModelStore, tmp_path: Path
) -> None:
    """Item 9: an archive whose hash matched but which is unsafe is not fetched again on
    every retry; its blob stays (it is what the snapshot names) until pruned."""
    spec = seed(store, make_tar([(entry("../up.txt"), b"x")]))
    with pytest.raises(ModelInvalid, match="unsafe archive"):
        await store.prepare(spec)
    assert store.blob_path(spec.sha256).exists()
    # The source does not exist (no NATS at all): a second try must not go there.
    store.blob_path(spec.sha256).unlink()
    with pytest.raises(ModelInvalid, match="unsafe archive") as err:
        await store.fetch(spec)
    assert "needs a NATS connection" not in str(err.value)
    assert await store.prune([]) == []
    with pytest.raises(ModelUnavailable, match="needs a NATS connection"):
        await store.fetch(spec)  # pruned: forgotten, so a new snapshot can name it again


async def test_cancelled_prepare_stops_unpacking_and_leaves_nothing(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer snapshot cancels an apply in progress: the unpacking thread stops at the
    next entry and the half-written directory is removed after it stopped."""
    started = threading.Event()
    saw_abort: list[bool] = []
    write_member = store_module._write_member

    def first_then_wait(src: Any, parent: int, name: str, mode: int, abort: Event) -> None:
        write_member(src, parent, name, mode, abort)
        started.set()
        saw_abort.append(abort.wait(10))

    monkeypatch.setattr(store_module, "_write_member", first_then_wait)
    spec = seed(store, make_tar([(entry(f"f{i}"), b"x" * 1000) for i in range(50)]))
    task = asyncio.create_task(store.prepare(spec))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert saw_abort == [True]  # one entry written, then the thread saw the abort and ended
    assert_nothing_prepared(store)
    assert store.blob_path(spec.sha256).exists()  # nothing wrong with the blob


@pytest.mark.parametrize("name", ["w\x00.bin", "d\x00ir/w.bin"])
async def test_a_nul_byte_in_a_name_is_an_unsafe_archive_remembered(
    store: ModelStore, name: str
) -> None:
    """Issue 20 item 8: a NUL in a (pax) member name raised a plain ValueError from
    `os.open`: not MODEL_INVALID, not remembered, so the node retried it forever."""
    info = entry(name)
    info.pax_headers = {"path": name}
    spec = seed(store, make_tar([(entry("fine.txt"), b"fine"), (info, b"x")]))
    with pytest.raises(ModelInvalid, match="unsafe archive.*NUL"):
        await store.prepare(spec)
    assert_nothing_prepared(store)
    store.blob_path(spec.sha256).unlink()  # remembered: refused without the blob
    with pytest.raises(ModelInvalid, match="unsafe archive.*NUL"):
        await store.fetch(spec)
