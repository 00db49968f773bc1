"""The intake's handling of JetStream pull status messages (100, 404, 408, 409), without a
server: a recorder stands in for the connection, and only the pull requests it is asked to
send are looked at."""

import json
from typing import Any

from nats.aio.msg import Msg

from worker.jobs.intake import JobSource

CREDIT = 64


class Connection:
    """Records pull requests; always connected."""

    is_connected = True
    is_closed = False

    def __init__(self) -> None:
        self.pulls: list[int] = []

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        assert subject == "$JS.API.CONSUMER.MSG.NEXT.RST_JOBS.rst-jobs-demo"
        self.pulls.append(json.loads(payload)["batch"])


class Source:
    def __init__(self) -> None:
        self.nc = Connection()
        self.delivered: list[Msg] = []
        self.lost = 0

        async def on_message(msg: Msg) -> None:
            self.delivered.append(msg)

        async def on_lost() -> None:
            self.lost += 1

        nc: Any = self.nc
        self.source = JobSource(
            nc,
            stream="RST_JOBS",
            consumer="rst-jobs-demo",
            credit=lambda: CREDIT,
            on_message=on_message,
            on_consumer_lost=on_lost,
        )

    async def pull(self) -> list[int]:
        """The pull requests a tick sends now (empty when the credit is all outstanding)."""
        before = len(self.nc.pulls)
        await self.source._pull_if_due()
        return self.nc.pulls[before:]

    async def status(self, code: str, description: str = "", pending: int | None = None) -> None:
        headers = {"Status": code, "Description": description}
        if pending is not None:
            headers["Nats-Pending-Messages"] = str(pending)
        await self.source._deliver(Msg(None, subject="_INBOX.test", headers=headers))


async def test_the_whole_credit_is_asked_once() -> None:
    s = Source()
    assert await s.pull() == [CREDIT]
    assert await s.pull() == []


async def test_heartbeat_changes_nothing() -> None:
    s = Source()
    await s.pull()
    await s.status("100", "Idle Heartbeat")
    assert await s.pull() == []
    assert s.delivered == [] and s.lost == 0


async def test_no_messages_frees_the_request() -> None:
    s = Source()
    await s.pull()
    await s.status("404", "No Messages")
    assert await s.pull() == [CREDIT]


async def test_expired_request_frees_what_it_still_had_pending() -> None:
    s = Source()
    await s.pull()
    await s.status("408", "Request Timeout", pending=CREDIT)
    assert await s.pull() == [CREDIT]


async def test_a_partly_served_request_frees_only_its_remainder() -> None:
    s = Source()
    await s.pull()
    await s.status("408", "Request Timeout", pending=CREDIT - 20)
    assert await s.pull() == [CREDIT - 20]


async def test_409_without_pending_count_forgets_every_request() -> None:
    s = Source()
    await s.pull()
    await s.status("409", "Exceeded MaxWaiting")
    assert await s.pull() == [CREDIT]
    assert s.lost == 0


async def test_consumer_deleted_is_reported_once() -> None:
    s = Source()
    await s.pull()
    await s.status("409", "Consumer Deleted")
    assert s.lost == 1
    assert await s.pull() == [CREDIT]


async def test_status_messages_never_reach_the_job_handler() -> None:
    s = Source()
    await s.pull()
    for code in ("100", "404", "408", "409"):
        await s.status(code)
    assert s.delivered == []
