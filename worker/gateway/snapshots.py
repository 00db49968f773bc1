"""The gateway's view of the network's configuration: the highest verified snapshot of its
own network, kept current by a watch on the config bucket's `snapshot` key.

A request reads `WatchedSnapshot.current` and does no I/O and no signature check for it:
each value is verified once, when the watch delivers it (`check_snapshot`, as the node
does), and only a newer version replaces the one held. The watch is re-created every
`resync_interval_s` (a watcher lost on the server's side comes back), and retried with
backoff while the bucket is missing or NATS answers with an error.
"""

import asyncio
import logging
from contextlib import AsyncExitStack

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.kv import KeyValue

from schemas.snapshot import Snapshot
from worker.core.errors import ConfigRejected
from worker.core.resource import AsyncResource
from worker.core.settings import Settings
from worker.node.snapshots import SNAPSHOT_KEY, check_snapshot, config_bucket

log = logging.getLogger(__name__)


class WatchedSnapshot(AsyncResource):
    """Usage:

    async with WatchedSnapshot(nc, settings) as snapshots:
        await snapshots.wait_synced()   # the bucket's value at start is known
        snapshots.current               # per request, no I/O
    """

    def __init__(self, nc: Client, settings: Settings, *, resync_interval_s: float = 30.0):
        super().__init__()
        self._nc = nc
        self._settings = settings
        self._keys = settings.authority_key_bytes()
        self._resync_interval_s = resync_interval_s
        self._current: Snapshot | None = None
        self._envelope: bytes | None = None
        self._refused: bytes | None = None
        """The last envelope refused: offered again, it is not checked (nor logged) again."""
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> Snapshot | None:
        """The highest verified snapshot of this network seen so far, if any."""
        return self._current

    async def wait_synced(self) -> None:
        """Block until the value the bucket held when the watch started has been offered
        (or the bucket was found missing or unreachable: `current` stays None until then)."""
        await self._synced.wait()

    async def _open(self, stack: AsyncExitStack) -> None:
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        self._task = tg.create_task(self._run(), name="gateway-snapshot-watch")

    async def _close(self) -> None:
        assert self._task is not None
        # nats-py swallows a cancellation in places: cancel until the task has ended.
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=0.1)

    async def _run(self) -> None:
        backoff = 0.2
        while self.is_open:
            try:
                kv = await self._nc.jetstream().key_value(config_bucket(self._settings))
                await self._watch_once(kv)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("gateway_snapshot_watch_failed error=%r retry_in_s=%.1f", exc, backoff)
                self._synced.set()  # requests go on: without a snapshot, no model is known
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._resync_interval_s)

    async def _watch_once(self, kv: KeyValue) -> None:
        watcher = await kv.watch(SNAPSHOT_KEY)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resync_interval_s
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
                except NatsTimeoutError:
                    break  # the resync is due
                if entry is None:  # the values present at the start were delivered
                    self._synced.set()
                elif entry.operation is None and entry.value:
                    self._offer(entry.value)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.debug("gateway_snapshot_watch_stop_failed error=%r", exc)

    def _offer(self, data: bytes) -> None:
        if data == self._envelope or data == self._refused:
            return
        floor = self._current.version if self._current is not None else 0
        try:
            snapshot, _ = check_snapshot(
                data, self._keys, network=self._settings.network, floor=floor
            )
        except ConfigRejected as exc:
            self._refused = data
            log.warning("gateway_snapshot_unverified reason=%s", exc)
            return
        self._current, self._envelope = snapshot, data
        log.info("gateway_snapshot version=%d models=%d", snapshot.version, len(snapshot.models))
