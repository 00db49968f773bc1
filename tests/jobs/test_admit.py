"""`admit`: one delivered job message decoded and checked, without a server."""

import msgpack
import pytest
from nats.aio.msg import Msg

from worker.core.errors import BadRequest, DeadlineExceeded, UnknownModel
from worker.jobs.intake import admit, delivery

NOW = 1_700_000_000.0


def delivered(body: object, *, subject: str = "rst.jobs.demo", delivered: int = 2) -> Msg:
    reply = f"$JS.ACK.RST_JOBS.rst-jobs-demo.{delivered}.41.7.1700000000000000000.0"
    data = body if isinstance(body, bytes) else msgpack.packb(body)
    return Msg(None, subject=subject, reply=reply, data=data, headers={"Nats-Msg-Id": "hdr-1"})


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.RST_JOBS.rst-jobs-demo.3.41.7.1700000000000000000.0",
        "$JS.ACK._.ACCOUNTHASH.RST_JOBS.rst-jobs-demo.3.41.7.1700000000000000000.0.r1",
        "$JS.ACK.hub.ACCOUNTHASH.RST_JOBS.rst-jobs-demo.3.41.7.1700000000000000000.0.r1",
    ],
    ids=["v1", "v2", "v2_domain"],
)
def test_delivery_facts_read_as_nats_py_reads_them(reply: str) -> None:
    msg = Msg(None, subject="rst.jobs.demo", reply=reply, data=b"")  # type: ignore[arg-type]
    meta = msg.metadata
    assert meta.sequence is not None
    assert delivery(msg) == (meta.num_delivered, meta.sequence.stream) == (3, 41)


def job(**over: object) -> dict[str, object]:
    return {"job_id": "j-1", "model_id": "demo", "prompt": "hello"} | over


def test_a_valid_job_is_admitted_with_its_delivery_facts() -> None:
    record, rejected = admit(delivered(job()), model_id="demo", max_bytes=4096, now=NOW)
    assert rejected is None
    assert record.job is not None and record.job_id == "j-1"
    assert (record.attempt, record.stream_seq) == (2, 41)
    assert len(record.input_sha256) == 64


@pytest.mark.parametrize(
    ("msg", "error", "job_id"),
    [
        (delivered(b"\xc1 not msgpack"), BadRequest, "hdr-1"),
        (delivered(job(prompt=7)), BadRequest, "hdr-1"),
        (delivered(job(prompt="x" * 5000)), BadRequest, "hdr-1"),
        (delivered(job(model_id="other"), subject="rst.jobs.other"), UnknownModel, "j-1"),
        (delivered(job(model_id="other")), UnknownModel, "j-1"),
        (delivered(job(deadline=NOW - 1)), DeadlineExceeded, "j-1"),
        (delivered(job(params={"max_tokens": 300_000})), BadRequest, "hdr-1"),
        (delivered(job(params={"max_tokens": 100_000, "logprobs": 20})), BadRequest, "hdr-1"),
    ],
    ids=[
        "garbage",
        "bad_field",
        "oversize",
        "other_model",
        "subject_mismatch",
        "expired",
        "job_of_death",
        "logprobs_of_death",
    ],
)
def test_a_rejected_job_keeps_a_record_for_its_error_event(
    msg: Msg, error: type[Exception], job_id: str
) -> None:
    record, rejected = admit(msg, model_id="demo", max_bytes=4096, now=NOW)
    assert isinstance(rejected, error)
    assert record.job_id == job_id


def test_a_deadline_still_ahead_is_admitted() -> None:
    _, rejected = admit(delivered(job(deadline=NOW + 1)), model_id="demo", max_bytes=4096, now=NOW)
    assert rejected is None


def test_a_malformed_msg_id_header_is_not_taken_as_job_id() -> None:
    msg = delivered(b"junk")
    msg.headers = {"Nats-Msg-Id": "has spaces and / slashes"}
    record, rejected = admit(msg, model_id="demo", max_bytes=4096, now=NOW)
    assert isinstance(rejected, BadRequest) and record.job_id is None
