"""Model fetch and verify from the NATS object store: the project's reader vs nats-py.

One object of `size_mb` random bytes is uploaded to an embedded nats-server. Then each
reader runs in a fresh Python process (so its peak RSS, VmHWM, is its own), writes the
object to a file, checks its SHA-256 and fsyncs it:

    ours          `ModelStore.fetch` (streamed chunks, size and SHA-256 checked, fsync,
                  moved into the cache)
    nats_py_get   nats-py `ObjectStore.get(writeinto=f)` (it checks the digest), + fsync
    nats_py_cb    nats-py ordered consumer in callback mode on the object's chunk subject,
                  each chunk hashed and written as it lands, + fsync: the stronger baseline

and, as the limit, `hashlib.sha256` over the same bytes already in memory. Warm runs
alternate the readers (ABBA); the cold runs drop the page cache before each reader
(`echo 3 > /proc/sys/vm/drop_caches`, root only; otherwise the figure says so).

    python -m bench.fetch --size-mb 1024 --reps 3
"""

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from bench.common import (
    Child,
    alternated,
    connected,
    embedded_nats,
    proc_status_kb,
    record,
    say,
    summary,
)
from schemas.snapshot import ModelSpec
from worker.models import objectstore
from worker.models.store import ModelStore

BUCKET = "rst_models"
NAME = "model"
READERS = ("ours", "nats_py_get", "nats_py_cb")
TARGET = ">= 250 MB/s and >= 0.2 of in-memory sha256, flat RSS"


def _write_random(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            data = os.urandom(min(4 << 20, left))
            h.update(data)
            f.write(data)
            left -= len(data)
    return h.hexdigest()


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# the readers, each in its own process


async def _read(reader: str, url: str, sha256: str, size: int, out_dir: Path) -> None:
    async with connected(url) as nc:
        js = nc.jetstream()
        rss0 = proc_status_kb("self", "VmRSS")
        t0 = time.perf_counter()
        if reader == "ours":
            spec = ModelSpec(
                id="bench", version="1", sha256=sha256, size=size, source=f"nats-object://{BUCKET}/{NAME}"
            )  # fmt: skip
            await ModelStore(out_dir / "cache", js=js).fetch(spec)
        elif reader == "nats_py_get":
            obs = await js.object_store(BUCKET)
            with (out_dir / "get.bin").open("wb") as f:
                await obs.get(NAME, writeinto=f)
                f.flush()
                os.fsync(f.fileno())
        else:
            await _ordered_callback(js, sha256, size, out_dir / "cb.bin")
        seconds = time.perf_counter() - t0
    say(
        "DONE",
        {
            "seconds": seconds,
            "rss_before_kb": rss0,
            "peak_rss_kb": proc_status_kb("self", "VmHWM"),
        },
    )


async def _ordered_callback(js: Any, sha256: str, size: int, dest: Path) -> None:
    info = await objectstore.get_info(js, BUCKET, NAME)
    h = hashlib.sha256()
    got = 0
    done = asyncio.Event()
    with dest.open("wb") as f:

        async def cb(msg: Msg) -> None:
            nonlocal got
            h.update(msg.data)
            f.write(msg.data)
            got += len(msg.data)
            if got >= size:
                done.set()

        sub = await js.subscribe(f"$O.{BUCKET}.C.{info.nuid}", ordered_consumer=True, cb=cb)
        await asyncio.wait_for(done.wait(), 600)
        await sub.unsubscribe()
        f.flush()
        os.fsync(f.fileno())
    if got != size or h.hexdigest() != sha256:
        raise RuntimeError(f"object mismatch: {got} bytes, sha256 {h.hexdigest()}")


# the parent


def _one(reader: str, url: str, sha256: str, size: int, cold: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rst-bench-fetch-", dir=_scratch()) as out:
        if cold:
            drop_page_cache()
        args = ["--reader", reader, "--url", url, "--sha256", sha256, "--size", str(size)]
        with Child("bench.fetch", *args, "--out", out) as child:
            done = child.expect("DONE", 900)
    return {
        "mb_s": size / 1e6 / done["seconds"],
        "peak_rss_mb": done["peak_rss_kb"] / 1024,
        "peak_rss_over_start_mb": (done["peak_rss_kb"] - done["rss_before_kb"]) / 1024,
    }


def _scratch() -> str:
    """Readers write where the benchmark's server stores: a disk, not a tmpfs."""
    return os.environ.get("RST_BENCH_SCRATCH", tempfile.gettempdir())


async def _run(size_mb: int, reps: int, cold_reps: int, tmp: Path) -> dict[str, Any]:
    size = size_mb << 20
    src = tmp / "model.bin"
    sha256 = await asyncio.to_thread(_write_random, src, size)
    runs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    figures: dict[str, Any] = {"size_mb": size_mb, "reps": reps}
    with embedded_nats() as server:
        async with connected(server.url) as nc:
            t = time.perf_counter()
            await objectstore.put_file(nc.jetstream(), BUCKET, NAME, src)
            figures["upload_mb_s"] = round(size / 1e6 / (time.perf_counter() - t), 1)
        for _, reader in alternated(READERS, reps):
            got = await asyncio.to_thread(_one, reader, server.url, sha256, size, False)
            for k, v in got.items():
                runs[reader][k].append(v)
        cold_ok = cold_reps > 0 and drop_page_cache()
        figures["cold_cache"] = (
            "not run"
            if cold_reps == 0
            else "page cache dropped before each"
            if cold_ok
            else "not run: dropping the page cache is not permitted here"
        )
        if cold_ok:
            for _, reader in alternated(READERS, cold_reps):
                got = await asyncio.to_thread(_one, reader, server.url, sha256, size, True)
                runs[f"cold_{reader}"]["mb_s"].append(got["mb_s"])
    data = src.read_bytes()
    hash_times = []
    for _ in range(3):
        t = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hash_times.append(size / 1e6 / (time.perf_counter() - t))
    del data
    for reader, metrics in runs.items():
        for k, values in metrics.items():
            figures[f"{reader}_{k}"] = summary(values, 1)
    figures["sha256_in_memory_mb_s"] = summary(hash_times, 1)
    limit = statistics.median(hash_times)
    ratio = summary([v / limit for v in runs["ours"]["mb_s"]])
    figures["ours_vs_nats_py_cb"] = summary(
        [a / b for a, b in zip(runs["ours"]["mb_s"], runs["nats_py_cb"]["mb_s"], strict=True)]
    )
    figures["ours_vs_nats_py_get"] = summary(
        [a / b for a, b in zip(runs["ours"]["mb_s"], runs["nats_py_get"]["mb_s"], strict=True)]
    )
    return record(
        "model fetch + verify + fsync (ratio: of in-memory sha256)", figures, ratio, TARGET
    )


def run(size_mb: int = 1024, reps: int = 3, cold_reps: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rst-bench-fetch-", dir=_scratch()) as tmp:
        return asyncio.run(_run(size_mb, reps, cold_reps, Path(tmp)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="object size in MiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cold-reps", type=int, default=1)
    parser.add_argument("--reader", choices=READERS, help="(internal) run one reader")
    parser.add_argument("--url")
    parser.add_argument("--sha256")
    parser.add_argument("--size", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.reader:
        asyncio.run(_read(args.reader, args.url, args.sha256, args.size, Path(args.out)))
        return
    print(json.dumps(run(args.size_mb, args.reps, args.cold_reps), indent=2))


if __name__ == "__main__":
    main()
