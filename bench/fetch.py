"""Model fetch and verify from the object store: the project's reader vs nats-py vs hashing.

In one run against an embedded nats-server: upload one object of `size_mb` random bytes,
then (1) `ModelStore.fetch` (streamed chunks, SHA-256 and size checked, written to the
cache), (2) nats-py `ObjectStore.get` of the same object written to a file (its streaming
mode; without `writeinto` it concatenates bytes in memory and is slower still), and (3)
`hashlib.sha256` over the same bytes already in memory, the limit. Target: at least
250 MB/s and 0.2 of the in-memory hashing rate, with a flat peak RSS.

    python -m bench.fetch --size-mb 1024
"""

import argparse
import asyncio
import hashlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import connected, embedded_nats, record
from schemas.snapshot import ModelSpec
from worker.models import objectstore
from worker.models.store import ModelStore

BUCKET = "rst_models"
TARGET_MB_S = 250.0
TARGET_RATIO = 0.2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = 4 << 20
    with path.open("wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left))
            h.update(data)
            f.write(data)
            left -= len(data)
    return h.hexdigest()


async def _run(size_mb: int, tmp: Path) -> dict[str, Any]:
    size = size_mb << 20
    src = tmp / "model.bin"
    sha256 = await asyncio.to_thread(_write_random, src, size)
    mb = size / 1e6
    figures: dict[str, Any] = {"size_mb": size_mb}
    with embedded_nats() as server:
        async with connected(server.url) as nc:
            js = nc.jetstream()
            t = time.perf_counter()
            await objectstore.put_file(js, BUCKET, "model", src)
            figures["upload_mb_s"] = round(mb / (time.perf_counter() - t), 1)
            spec = ModelSpec(
                id="bench",
                version="1",
                sha256=sha256,
                size=size,
                source=f"nats-object://{BUCKET}/model",
            )

            # (1) ours first, so the process's peak RSS so far is what it used.
            store = ModelStore(tmp / "cache", js=js)
            rss_before = _rss_mb()
            t = time.perf_counter()
            blob = await store.fetch(spec)
            ours_s = time.perf_counter() - t
            figures["fetch_verify_mb_s"] = round(mb / ours_s, 1)
            figures["fetch_peak_rss_delta_mb"] = round(_peak_rss_mb() - rss_before, 1)

            # (2) nats-py ObjectStore.get into a file (it checks the digest itself).
            obs = await js.object_store(BUCKET)
            t = time.perf_counter()
            with (tmp / "official.bin").open("wb") as f:
                await obs.get("model", writeinto=f)
            official_s = time.perf_counter() - t
            figures["nats_py_get_mb_s"] = round(mb / official_s, 1)
            (tmp / "official.bin").unlink()

    # (3) the limit: hashing bytes already in memory.
    data = blob.read_bytes()
    t = time.perf_counter()
    assert hashlib.sha256(data).hexdigest() == sha256
    hash_s = time.perf_counter() - t
    del data
    figures["sha256_in_memory_mb_s"] = round(mb / hash_s, 1)
    figures["vs_nats_py_get"] = round(official_s / ours_s, 2)
    ratio = round(hash_s / ours_s, 3)
    figures["ratio_of_in_memory_hash"] = ratio
    figures["meets_target"] = figures["fetch_verify_mb_s"] >= TARGET_MB_S and ratio >= TARGET_RATIO
    return record(
        "model_fetch_verify",
        figures,
        ratio,
        f">= {TARGET_MB_S:.0f} MB/s and >= {TARGET_RATIO} of in-memory sha256, flat RSS",
    )


def run(size_mb: int = 1024) -> dict[str, Any]:
    """One benchmark run; returns {name, figures, ratio, target}."""
    with tempfile.TemporaryDirectory(prefix="rst-bench-fetch-") as tmp:
        return asyncio.run(_run(size_mb, Path(tmp)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="object size in MiB")
    args = parser.parse_args()
    print(json.dumps(run(args.size_mb), indent=2))


if __name__ == "__main__":
    main()
