"""Model store against a real nats-server: verified fetch, clean failures, safe extraction."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from schemas.snapshot import ModelSpec
from worker.core.errors import ModelInvalid, ModelUnavailable
from worker.models import objectstore
from worker.models.store import ModelStore

pytestmark = pytest.mark.nats


def spec_for(data: bytes, name: str = "m1", **over: object) -> ModelSpec:
    fields: dict[str, object] = {
        "id": "m1",
        "version": "1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "source": f"nats-object://rst_models/{name}",
    }
    fields.update(over)
    return ModelSpec.model_validate(fields)


async def publish(js: JetStreamContext, tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / f"upload-{name}"
    path.write_bytes(data)
    await objectstore.put_file(js, "rst_models", name, path, chunk_size=4096)


def assert_clean(store: ModelStore) -> None:
    assert store.cached() == set()
    assert list((store.cache_dir / "tmp").iterdir()) == []


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
def store(js: JetStreamContext, tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "cache", js=js, attempts=2, backoff_s=0.01, idle_timeout_s=2)


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


async def test_fetch_verifies_and_caches(js: JetStreamContext, store: ModelStore, tmp_path: Path):
    data = os.urandom(300_000)
    await publish(js, tmp_path, "m1", data)
    spec = spec_for(data)
    blob = await store.fetch(spec)
    assert blob == store.blob_path(spec.sha256)
    assert blob.read_bytes() == data
    assert store.cached() == {spec.sha256}
    assert await store.fetch(spec) == blob  # cached: no second download
    model_dir = await store.prepare(spec)
    assert (model_dir / "model.bin").read_bytes() == data


async def test_official_client_reads_what_we_upload(js: JetStreamContext, tmp_path: Path):
    data = os.urandom(200_001)
    await publish(js, tmp_path, "m1", data)
    result = await (await js.object_store("rst_models")).get("m1")
    assert result.data == data


async def test_tampered_bytes_are_never_cached(
    js: JetStreamContext, store: ModelStore, tmp_path: Path
):
    data = os.urandom(50_000)
    await publish(js, tmp_path, "m1", data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ModelInvalid, match=f"expected {wrong}"):
        await store.fetch(spec_for(data, sha256=wrong))
    assert_clean(store)


async def test_tampered_bytes_with_lying_meta_are_caught_while_streaming(
    js: JetStreamContext, store: ModelStore, tmp_path: Path
):
    data = os.urandom(50_000)
    await publish(js, tmp_path, "m1", data)
    info = await objectstore.get_info(js, "rst_models", "m1")
    info.digest = None  # a meta without a digest: only the streamed hash can tell
    await js.publish(
        objectstore._meta_subject("rst_models", "m1"),
        json.dumps(info.as_dict()).encode(),
        headers={api.Header.ROLLUP: "sub"},
    )
    wanted = hashlib.sha256(b"x" * len(data)).hexdigest()
    with pytest.raises(ModelInvalid, match=f"SHA-256 mismatch: expected {wanted}, got"):
        await store.fetch(spec_for(data, sha256=wanted))
    assert_clean(store)


async def test_wrong_size_is_refused(js: JetStreamContext, store: ModelStore, tmp_path: Path):
    data = os.urandom(50_000)
    await publish(js, tmp_path, "m1", data)
    with pytest.raises(ModelInvalid, match="expected 49999 bytes"):
        await store.fetch(spec_for(data, size=49_999))
    assert_clean(store)


async def test_missing_source(store: ModelStore):
    with pytest.raises(ModelUnavailable, match="not found"):
        await store.fetch(spec_for(b"abc", name="absent"))
    assert_clean(store)


async def test_truncated_object_is_retried_then_refused(
    js: JetStreamContext, store: ModelStore, tmp_path: Path
):
    data = os.urandom(40_000)
    await publish(js, tmp_path, "m1", data)
    info = await objectstore.get_info(js, "rst_models", "m1")
    stream = await js.stream_info("OBJ_rst_models")
    # Chunks are the first messages of the stream; lose one in the middle.
    assert info.chunks and info.chunks > 3
    await js.delete_msg("OBJ_rst_models", stream.state.first_seq + 2)
    with pytest.raises(ModelUnavailable, match="failed after 2 attempts.*ends after"):
        await store.fetch(spec_for(data))
    assert_clean(store)


async def test_tar_is_extracted_and_rehashed(
    js: JetStreamContext, store: ModelStore, tmp_path: Path
):
    top = tarfile.TarInfo("model")
    top.type = tarfile.DIRTYPE
    data = make_tar(
        [
            (top, None),
            (tarfile.TarInfo("model/config.json"), b'{"a": 1}'),
            (tarfile.TarInfo("model/weights.bin"), os.urandom(70_000)),
        ]
    )
    await publish(js, tmp_path, "m1", data)
    spec = spec_for(data)
    model_dir = await store.prepare(spec)
    assert (model_dir / "model" / "config.json").read_bytes() == b'{"a": 1}'
    assert (model_dir / "model" / "weights.bin").stat().st_size == 70_000
    assert (model_dir / "model" / "weights.bin").stat().st_mode & 0o777 == 0o644
    second = await store.prepare(spec)
    assert second != model_dir and second.is_dir()


@pytest.mark.parametrize(
    "member",
    [
        ("../escape", tarfile.REGTYPE, ""),
        ("/abs/path", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "../../etc/passwd"),
        ("hard", tarfile.LNKTYPE, "/etc/passwd"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
async def test_unsafe_tar_is_refused(
    js: JetStreamContext, store: ModelStore, tmp_path: Path, member: tuple[str, bytes, str]
):
    name, kind, target = member
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    data = make_tar(
        [(tarfile.TarInfo("ok.txt"), b"fine"), (info, b"x" if kind == tarfile.REGTYPE else None)]
    )
    await publish(js, tmp_path, "m1", data)
    with pytest.raises(ModelInvalid, match="unsafe archive"):
        await store.prepare(spec_for(data))
    assert list((store.cache_dir / "models").iterdir()) == []
    assert not (tmp_path / "escape").exists()


async def test_blob_tampered_on_disk_is_caught_before_start(
    js: JetStreamContext, store: ModelStore, tmp_path: Path
):
    data = os.urandom(20_000)
    await publish(js, tmp_path, "m1", data)
    spec = spec_for(data)
    blob = await store.fetch(spec)
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(100)
        f.write(b"\0" * 8)
    with pytest.raises(ModelInvalid, match="SHA-256 mismatch"):
        await store.prepare(spec)
    assert_clean(store)
    assert list((store.cache_dir / "models").iterdir()) == []


async def test_prune_removes_unapproved(js: JetStreamContext, store: ModelStore, tmp_path: Path):
    a, b = os.urandom(10_000), os.urandom(11_000)
    await publish(js, tmp_path, "a", a)
    await publish(js, tmp_path, "b", b)
    spec_a = spec_for(a, name="a")
    spec_b = spec_for(b, name="b", id="m2")
    await store.prepare(spec_a)
    await store.fetch(spec_b)
    removed = await store.prune([spec_b.sha256])
    assert removed == [spec_a.sha256]
    assert store.cached() == {spec_b.sha256}
    assert not store.blob_path(spec_a.sha256).exists()
    assert list((store.cache_dir / "models").iterdir()) == []


async def test_evict_takes_the_least_recently_served_first_and_spares_the_kept(
    js: JetStreamContext, store: ModelStore, tmp_path: Path
):
    blobs = {name: os.urandom(10_000) for name in ("a", "b", "c")}
    specs = {}
    for when, (name, data) in enumerate(blobs.items(), start=1):
        await publish(js, tmp_path, name, data)
        specs[name] = spec_for(data, name=name, id=name)
        await store.prepare(specs[name])
        os.utime(store.blob_path(specs[name].sha256), (when * 1000, when * 1000))
    await store.touch(specs["a"].sha256)  # served just now: a is the most recent
    assert store.cached_bytes() == 30_000
    kept = {specs["b"].sha256}  # b is the oldest but in the loadout
    assert await store.evict(kept, 20_000) == [specs["c"].sha256]
    assert store.cached() == {specs["a"].sha256, specs["b"].sha256}
    assert not list((store.cache_dir / "models").glob(f"{specs['c'].sha256}.*"))
    assert await store.evict(kept, 20_000) == []
