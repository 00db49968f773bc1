"""What a node answers besides jobs: the signed heartbeat and the status endpoint.

The status endpoint is a plain subscription on `<prefix>.nodes.<node_id>.status` with no
queue group: a queue group would let any client that joins it take requests meant for this
node, and answer them in its name.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import encode
from schemas.node import NodeStatus, StatusReply
from worker.jobs.publisher import Publisher

log = logging.getLogger(__name__)


async def heartbeat_loop(
    publisher: Publisher,
    status: Callable[[], NodeStatus],
    interval_s: float,
    sent: Callable[[float], None] | None = None,
) -> None:
    """Publish a heartbeat every `interval_s` until cancelled; a failed one is skipped.
    `sent` is told the time of each one published."""
    while True:
        try:
            await publisher.heartbeat(status())
            if sent is not None:
                sent(time.time())
        except Exception as exc:
            log.debug("heartbeat_failed error=%r", exc)
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def status_endpoint(
    nc: Client, subject: str, reply: Callable[[], StatusReply]
) -> AsyncIterator[None]:
    """Answer every request on `subject` with `reply()`, msgpack-encoded, while entered."""

    async def handle(msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            await msg.respond(encode(reply()))
        except Exception as exc:
            log.warning("status_reply_failed error=%r", exc)

    subscription = await nc.subscribe(subject, cb=handle)
    try:
        yield
    finally:
        try:
            await subscription.unsubscribe()
        except Exception as exc:  # the connection may be closing already
            log.debug("status_unsubscribe_failed error=%r", exc)
