"""Results are reported stored only on the stream's PubAck, against a real nats-server.

The publisher takes PubAcks on its own inbox with one deadline timer for all waits (no
nats-py request per result): each way a store can end is checked here — new, duplicate,
no stream, refused by the stream, no answer at all — and a wait never outlives its result.
"""

import asyncio
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from tests.support.pipeline import settings_for
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify
from worker.jobs.provision import provision
from worker.jobs.publisher import Attestation, Publisher, _pub_ack_outcome, tell

pytestmark = pytest.mark.nats


ATTESTS = Attestation.of(
    {"id": "demo", "version": "1", "sha256": "a" * 64},
    {"image": "i", "engine": "e", "engine_version": "1", "device": "cpu"},
)


def fields(job_id: str, text: str = "ok") -> dict[str, Any]:
    return {
        "job_id": job_id,
        "config_version": 1,
        "input_sha256": "b" * 64,
        "output": {"text": text, "token_ids": [1, 2], "finish_reason": "stop"},
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "attempt": 1,
        "started_at": 1.0,
        "finished_at": 2.0,
    }


def publisher(nc: Client, settings: Settings, **kw: float) -> Publisher:
    return Publisher(nc, nc.jetstream(), NodeKey.generate(), settings, **kw)


async def test_new_then_duplicate_and_the_stored_result_verifies(
    nc: Client, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    pub = publisher(nc, settings)
    results = await asyncio.gather(
        *(pub.publish_result(pub.seal_result(ATTESTS, fields(f"j{i}"))) for i in range(50))
    )
    assert results == [True] * 50
    assert await pub.publish_result(pub.seal_result(ATTESTS, fields("j7", text="again"))) is False
    msg = await js.get_last_msg(settings.stream("RESULTS"), settings.subject("results", "j7"))
    stored = verify(msg.data)
    assert stored.body["output"]["text"] == "ok" and stored.signer == pub.node_id
    assert pub.acks_pending == 0  # no wait outlives its result


async def test_no_stream_for_the_subject(nc: Client, tmp_path: Path) -> None:
    pub = publisher(nc, settings_for(tmp_path))
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await pub.publish_result(pub.seal_result(ATTESTS, fields("nostream")))


async def test_a_store_the_stream_refuses_is_an_api_error(nc: Client, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    name = settings.stream("RESULTS")
    info = await js.stream_info(name)
    config: StreamConfig = info.config
    config.max_msg_size = 64  # every signed result is larger
    await js.update_stream(config)
    pub = publisher(nc, settings)
    with pytest.raises(nats.js.errors.APIError) as caught:
        await pub.publish_result(pub.seal_result(ATTESTS, fields("toolarge")))
    assert caught.value.code is not None


async def test_no_puback_at_all_times_out(nc: Client, tmp_path: Path) -> None:
    """A subscriber that never answers stands in for a stream that lost the request."""
    settings = settings_for(tmp_path)
    seen: list[str] = []

    async def swallow(msg: Any) -> None:
        seen.append(msg.subject)

    await nc.subscribe(settings.subject("results", ">"), cb=swallow)
    pub = publisher(nc, settings, publish_timeout_s=0.3)
    with pytest.raises(nats.errors.TimeoutError):
        await pub.publish_result(pub.seal_result(ATTESTS, fields("silent")))
    assert seen == [settings.subject("results", "silent")]
    assert pub.acks_pending == 0


def test_a_failing_landed_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(outcome: bool | BaseException) -> None:
        raise RuntimeError("bug in the caller")

    tell(broken, True)  # the PubAck path goes on
    assert "result_landed_callback_failed" in caplog.text


async def test_a_publish_that_outlives_its_deadline_has_one_outcome(tmp_path: Path) -> None:
    """The publish hangs past `publish_timeout_s`, then fails: the result's outcome is the
    timeout, told once; the late failure is not raised as a second one."""
    told: list[bool | BaseException] = []
    timed_out = asyncio.Event()

    def landed(outcome: bool | BaseException) -> None:
        told.append(outcome)
        timed_out.set()

    class HangingClient:
        max_payload = 1 << 20

        def new_inbox(self) -> str:
            return "_INBOX.test"

        async def subscribe(self, subject: str, cb: Any) -> None:
            return None

        async def publish(self, *args: Any, **kwargs: Any) -> None:
            await timed_out.wait()  # stuck until the deadline has passed
            raise nats.errors.ConnectionClosedError()

    key = NodeKey.generate()
    pub = Publisher(HangingClient(), None, key, settings_for(tmp_path), publish_timeout_s=0.05)  # type: ignore[arg-type]
    await pub.store_result(pub.seal_result(ATTESTS, fields("late")), landed)
    assert len(told) == 1 and isinstance(told[0], nats.errors.TimeoutError)
    assert pub.acks_pending == 0


@pytest.mark.parametrize(
    ("headers", "data", "expected"),
    [
        (None, b'{"stream":"RST_RESULTS","seq":7}', True),
        (None, b'{"stream":"RST_RESULTS","seq":7,"duplicate":true}', False),
        ({"Status": "503"}, b"", nats.js.errors.NoStreamResponseError),
        (None, b"not json", nats.errors.Error),
        (None, b'{"error":{"code":400,"err_code":10054,"description":"bad"}}', APIError),
        (None, b'{"error":"no code"}', APIError),
        (None, b"[1, 2]", APIError),
    ],
    ids=["stored", "duplicate", "no_stream", "not_json", "refused", "malformed_error", "not_map"],
)
def test_each_puback_answer_is_one_outcome(
    headers: dict[str, str] | None, data: bytes, expected: object
) -> None:
    msg = Msg(None, subject="_INBOX.x.1", data=data, headers=headers)  # type: ignore[arg-type]
    outcome = _pub_ack_outcome(msg)
    if isinstance(expected, bool):
        assert outcome is expected
    else:
        assert isinstance(outcome, expected)  # type: ignore[arg-type]


def test_a_result_names_every_gpu_its_runtime_saw_and_none_on_cpu() -> None:
    model = {"id": "m", "version": "1", "sha256": "cd" * 32}
    cpu = {"image": "img", "engine": "vllm", "engine_version": "0.32.0", "device": "cpu"}
    assert "devices" not in Attestation.of(model, cpu).wire[1]
    gpus = [
        {"name": "NVIDIA H200", "uuid": f"GPU-0f1e2d3c-{i:04d}", "memory_bytes": 150 << 30}
        for i in range(2)
    ]
    wire = Attestation.of(model, {**cpu, "device": "NVIDIA H200", "devices": gpus}).wire[1]
    assert wire["devices"] == gpus
