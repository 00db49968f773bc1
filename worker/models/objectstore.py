"""Fast, constant-memory reads and writes of JetStream object-store objects.

nats-py's `ObjectStore.get` accumulates the whole object in memory and slows down with
size; here the object's chunks (`$O.<bucket>.C.<nuid>` in stream `OBJ_<bucket>`) are read
through an ordered consumer and handed in batches to a sink that runs in a worker thread,
so that hashing and disk writes overlap with receiving. The wire layout (meta JSON with
a `SHA-256=` digest, rollup meta message) is the one nats-py and the Go client use.
"""

import asyncio
import base64
import hashlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

log = logging.getLogger(__name__)

# Uploads use 512 KiB chunks (nats-py's default is 128 KiB): a quarter of the messages for
# the same bytes, which measured ~1.4x faster fetches here. Fits the default 1 MiB
# max_payload; the reader takes objects of any chunk size.
DEFAULT_CHUNK_SIZE = 512 * 1024
DIGEST_PREFIX = "SHA-256="
BATCH_BYTES = 4 << 20
PUBLISH_WINDOW = 64

ChunkSink = Callable[[list[bytes]], None]
"""Receives chunks in order, in a worker thread; may raise to abort the read."""

Progress = Callable[[int], None]
"""Called on the event loop with the number of bytes done so far."""


class ObjectMissing(Exception):
    """The bucket or the object does not exist (or was deleted)."""


class ObjectReadError(Exception):
    """The object's chunks could not be read in full (stalled, short or oversized)."""


def digest_hex(info: api.ObjectInfo) -> str | None:
    """The object's SHA-256 from its meta, as lowercase hex (None if absent)."""
    if not info.digest:
        return None
    text = info.digest
    if text.upper().startswith(DIGEST_PREFIX):
        text = text[len(DIGEST_PREFIX) :]
    try:
        return base64.urlsafe_b64decode(text).hex()
    except ValueError:
        return None


def _stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


async def get_info(js: JetStreamContext, bucket: str, name: str) -> api.ObjectInfo:
    """The object's meta; raises `ObjectMissing` for an absent bucket, object or a link."""
    try:
        store = await js.object_store(bucket)
        info = await store.get_info(name)
    except (BucketNotFoundError, ObjectNotFoundError, NotFoundError) as exc:
        raise ObjectMissing(f"object {name!r} not found in bucket {bucket!r}") from exc
    if info.is_link():
        raise ObjectMissing(f"object {name!r} in bucket {bucket!r} is a link; publish the bytes")
    if not info.nuid:
        raise ObjectMissing(f"object {name!r} in bucket {bucket!r} has no chunks (bad meta)")
    return info


async def read_chunks(
    js: JetStreamContext,
    info: api.ObjectInfo,
    sink: ChunkSink,
    *,
    idle_timeout_s: float = 10.0,
    progress: Progress | None = None,
) -> int:
    """Stream the object's chunks into `sink`, returning the byte count.

    An ephemeral push consumer with flow control delivers to a plain subscription; the
    flow-control reply is sent when the iteration reaches it, so the server runs ahead by
    at most its flow-control window while one batch is sunk and the next is received:
    memory stays bounded whatever the object's size. Raises `ObjectReadError` if no chunk
    arrives for `idle_timeout_s`, a chunk is missing, or the chunks exceed the declared size.
    """
    size = info.size or 0
    if size == 0:
        return 0
    nc = js._nc
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_msgs_limit=0, pending_bytes_limit=0)
    jsm = nc.jsm()
    stream = _stream(info.bucket)
    consumer: str | None = None
    received = 0
    expected_seq = 1
    batch: list[bytes] = []
    batch_bytes = 0
    sinking: asyncio.Future[None] | None = None
    try:
        created = await jsm.add_consumer(
            stream,
            api.ConsumerConfig(
                deliver_subject=inbox,
                filter_subject=f"$O.{info.bucket}.C.{info.nuid}",
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.NONE,
                flow_control=True,
                idle_heartbeat=min(5.0, idle_timeout_s / 2),
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=60.0,
            ),
        )
        consumer = created.name
        async with asyncio.timeout(loop.time() + idle_timeout_s) as idle:
            async for msg in sub.messages:
                data = msg.data
                if not data and msg.headers and msg.headers.get(api.Header.STATUS) == "100":
                    # Flow control request, or a heartbeat that says the consumer stalled.
                    reply = msg.reply or msg.headers.get(api.Header.CONSUMER_STALLED)
                    if reply:
                        await nc.publish(reply)
                    continue
                idle.reschedule(loop.time() + idle_timeout_s)
                seq, pending = _consumer_position(msg.reply)
                if seq != expected_seq:
                    raise ObjectReadError(
                        f"object {info.name!r}: chunk {expected_seq} missing (got {seq})"
                    )
                expected_seq += 1
                received += len(data)
                if received > size:
                    raise ObjectReadError(
                        f"object {info.name!r} has more bytes than its meta says ({size})"
                    )
                batch.append(data)
                batch_bytes += len(data)
                done = received == size
                if pending == 0 and not done:
                    raise ObjectReadError(
                        f"object {info.name!r}: the stream ends after {received} of {size} bytes"
                    )
                if batch_bytes >= BATCH_BYTES or done:
                    if sinking is not None:
                        await sinking
                    sinking = loop.run_in_executor(None, sink, batch)
                    batch, batch_bytes = [], 0
                    if progress is not None:
                        progress(received)
                if done:
                    break
            if sinking is not None:
                await sinking
                sinking = None
    except TimeoutError as exc:
        raise ObjectReadError(
            f"object {info.name!r}: no chunk for {idle_timeout_s:.0f}s after "
            f"{received} of {size} bytes"
        ) from exc
    finally:
        if sinking is not None:
            # Let the worker thread finish its batch before the caller closes the file.
            await asyncio.wait([sinking])
        await _quietly(sub.unsubscribe())
        if consumer is not None:
            await _quietly(jsm.delete_consumer(stream, consumer))
    if received != size:
        raise ObjectReadError(f"object {info.name!r}: got {received} of {size} bytes")
    return received


def _consumer_position(reply: str | None) -> tuple[int, int]:
    """Consumer sequence and messages pending, from a JetStream ack subject
    (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`, possibly
    with domain and account tokens after `ACK`)."""
    tokens = (reply or "").split(".")
    base = 2 if len(tokens) == 9 else 4
    try:
        return int(tokens[base + 4]), int(tokens[base + 6])
    except (IndexError, ValueError):
        return -1, -1


async def _quietly(op: Awaitable[object]) -> None:
    """Cleanup that may fail when the connection is gone; the consumer expires anyway."""
    try:
        await asyncio.wait_for(op, 5.0)
    except Exception as exc:
        log.debug("object_cleanup_failed error=%r", exc)


def _read_batch(f: BinaryIO, h: "hashlib._Hash", chunk_size: int, count: int) -> list[bytes]:
    chunks = []
    for _ in range(count):
        data = f.read(chunk_size)
        if not data:
            break
        h.update(data)
        chunks.append(data)
    return chunks


async def put_file(
    js: JetStreamContext,
    bucket: str,
    name: str,
    path: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    description: str | None = None,
    progress: Progress | None = None,
) -> api.ObjectInfo:
    """Upload a file as object `name`, creating the bucket if needed.

    Reads in a worker thread and publishes with a bounded window of unacknowledged chunks,
    so memory stays flat and the upload does not wait for one ack per chunk.
    """
    try:
        store = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        store = await js.create_object_store(bucket)
    try:
        previous: api.ObjectInfo | None = await store.get_info(name)
    except (ObjectNotFoundError, NotFoundError):
        previous = None
    nuid = js._nc._nuid.next().decode()
    subject = f"$O.{bucket}.C.{nuid}"
    stream = _stream(bucket)
    h = hashlib.sha256()
    total = 0
    chunks = 0
    window: deque[asyncio.Future[api.PubAck]] = deque()
    per_batch = max(1, BATCH_BYTES // chunk_size)
    try:
        with path.open("rb") as f:
            while True:
                batch = await asyncio.to_thread(_read_batch, f, h, chunk_size, per_batch)
                if not batch:
                    break
                for data in batch:
                    while len(window) >= PUBLISH_WINDOW:
                        await window.popleft()
                    window.append(await js.publish_async(subject, data))
                    total += len(data)
                    chunks += 1
                if progress is not None:
                    progress(total)
        while window:
            await window.popleft()
        info = api.ObjectInfo(
            name=name,
            bucket=bucket,
            nuid=nuid,
            size=total,
            chunks=chunks,
            mtime=datetime.now(UTC).isoformat(),
            digest=DIGEST_PREFIX + base64.urlsafe_b64encode(h.digest()).decode(),
            description=description,
            options=api.ObjectMetaOptions(max_chunk_size=chunk_size),
        )
        await js.publish(
            _meta_subject(bucket, name),
            json.dumps(info.as_dict()).encode(),
            headers={api.Header.ROLLUP: "sub"},
        )
    except BaseException:
        for fut in window:
            fut.cancel()
        await js.purge_stream(stream, subject=subject)
        raise
    if previous is not None and previous.nuid and not previous.deleted:
        await js.purge_stream(stream, subject=f"$O.{bucket}.C.{previous.nuid}")
    log.info("object_published bucket=%s name=%s size=%d chunks=%d", bucket, name, total, chunks)
    return info
