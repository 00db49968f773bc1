"""Fuzzing with hypothesis, at volume:

- job payloads (random bytes, type confusion, huge values, deep nesting, wrong model, bad
  chat messages, hostile response_format schemas, bad
  UTF-8, oversize) mixed with valid jobs into a running pipeline on a real nats-server:
  the pipeline stays up, each bad job gets exactly one signed final error event, each valid
  job exactly one verified result;
- forged, mutated and rolled-back snapshots against `check_snapshot`: none accepted;
- tampered model bytes behind a `nats-object://` source: never returned, cache left clean.

Each fuzz test asserts that it drew every kind of case it knows (so a fuzz that did not
run, or drew one kind only, fails) and logs its case counts.
"""

import asyncio
import hashlib
import itertools
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import decode
from schemas.envelope import EnvelopeType, pack_envelope
from schemas.frames import PARAM_NAMES
from schemas.job import Job
from schemas.snapshot import ModelSpec, Snapshot
from tests.support.jobnet import EchoRuntime, errors, publish_job, results
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.errors import ModelInvalid
from worker.core.resource import ResourceState
from worker.core.signing import NodeKey
from worker.devtools.natsd import NatsServer
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import provision
from worker.jobs.publisher import Publisher
from worker.models import objectstore
from worker.models.store import ModelStore
from worker.node.snapshots import ConfigRejected, check_snapshot

log = logging.getLogger(__name__)
SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
MAX_JOB_BYTES = 16 * 1024
SERVING = Serving("demo", "1", "a" * 64, "sha256:" + "1" * 64, 3)


def _check_coverage(name: str, counts: Counter[str], kinds: list[str]) -> None:
    log.info("fuzz_counts fuzz=%s counts=%s", name, dict(sorted(counts.items())))
    missing = sorted(set(kinds) - {k.removeprefix("kind_") for k in counts})
    assert not missing, f"the {name} fuzz never drew {missing}: {dict(counts)}"


# -- job payloads -----------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)

valid_params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2) | st.integers(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(-1, 100),
        "seed": st.integers(0, (1 << 63) - 1),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=3),
        "logprobs": st.integers(0, 20),
        "presence_penalty": st.floats(-2, 2) | st.integers(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "response_format": st.sampled_from(
            [
                {"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}},
                {
                    "type": "json_schema",
                    "json_schema": {"name": "b", "schema": {"type": "object"}, "strict": True},
                },
            ]
        ),
    },
)

valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": st.text(max_size=40),
        }
    ),
    min_size=1,
    max_size=6,
)


def _valid(job_id: str, prompt: Any, params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"job_id": job_id, "model_id": "demo", "params": params}
    if isinstance(prompt, str):
        body["prompt"] = prompt
    elif prompt and isinstance(prompt[0], dict):
        body["messages"] = prompt
    else:
        body["prompt_token_ids"] = prompt
    return body


valid_prompt = (
    st.text(max_size=200) | st.lists(st.integers(0, (1 << 31) - 1), min_size=1) | valid_messages
)


def _schema(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"a": value}}
    return value


hostile_schemas = st.one_of(
    st.builds(_schema, st.integers(17, 300)),  # nested deeper than the limit
    st.builds(lambda n: {"enum": ["x" * 64] * n}, st.integers(300, 2000)),  # over 16 KiB
    st.builds(lambda b: {"const": b}, st.binary(max_size=8)),  # not JSON
    st.builds(lambda k: {k: 1}, st.integers(-(1 << 63), (1 << 64) - 1)),  # a non-string key
    msgpack_values.filter(lambda v: not isinstance(v, dict)),  # not a map at all
)

hostile_messages = st.one_of(
    st.just([]),
    st.lists(st.just({"role": "user", "content": "x"}), min_size=257, max_size=300),
    st.builds(lambda r: [{"role": r, "content": "x"}], st.text(max_size=12)),
    st.builds(lambda c: [{"role": "user", "content": c}], msgpack_values),
    st.builds(lambda v: [v], msgpack_values),
    st.just([{"role": "user", "content": "x", "name": "tool"}]),
    st.just([{"role": "user", "content": "x" * (100 * 1024)}] * 3),
)


def _nest(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def _bad_utf8(body: dict[str, Any], junk: bytes) -> bytes:
    marker = "\u0001" * len(junk)
    body["prompt"] = marker
    packed: bytes = msgpack.packb(body)
    return packed.replace(marker.encode(), junk, 1)


FIELDS = ["job_id", "model_id", "prompt", "prompt_token_ids", "messages", "params", "deadline"]
PARAMS = sorted(PARAM_NAMES)  # the runtime's own list: every param is fuzzed
HUGE_FIELDS = ["max_tokens", "seed", "token", "temperature", "deadline", "logprobs"]
HUGE_FIELDS += ["presence_penalty", "frequency_penalty"]


JOB_KINDS = [
    *["valid"] * 3,
    "random_bytes",
    "not_a_map",
    "type_confusion",
    "params_confusion",
    "huge_values",
    "deep_nesting",
    "wrong_model",
    "bad_utf8",
    "oversize",
    "extra_key",
    "expired",
    "bad_messages",
    "hostile_schema",
]


@st.composite
def job_payload(draw: st.DrawFn, job_id: str) -> tuple[str, bytes]:
    """(category, bytes) for one job published under `job_id`."""
    base = _valid(job_id, draw(valid_prompt), draw(valid_params))
    kind = draw(st.sampled_from(JOB_KINDS))
    if kind == "random_bytes":
        return kind, draw(st.binary(max_size=400))
    if kind == "not_a_map":
        return kind, msgpack.packb(draw(msgpack_values.filter(lambda v: not isinstance(v, dict))))
    if kind == "type_confusion":
        base[draw(st.sampled_from(FIELDS))] = draw(msgpack_values)
    elif kind == "params_confusion":
        base["params"] = {draw(st.sampled_from(PARAMS)): draw(msgpack_values)}
    elif kind == "huge_values":
        field = draw(st.sampled_from(HUGE_FIELDS))
        huge = draw(st.integers(1 << 31, (1 << 64) - 1) | st.just(1e308) | st.just(-(1 << 63)))
        if field == "token":
            base.pop("prompt", None)
            base.pop("messages", None)
            base["prompt_token_ids"] = [1, huge]
        elif field == "deadline":
            base["deadline"] = -float(huge)
        else:
            base["params"] = {field: huge}
    elif kind == "deep_nesting":
        where = draw(st.sampled_from(["stop", "prompt", "extra"]))
        nested = _nest(draw(st.integers(5, 400)))
        if where == "stop":
            base["params"] = {"stop": nested}
        elif where == "prompt":
            base["prompt"] = nested
        else:
            base["params"] = {"nested": {"deeper": nested}}
    elif kind == "wrong_model":
        base["model_id"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
    elif kind == "bad_utf8":
        junk = draw(st.binary(min_size=1, max_size=12).filter(_not_utf8))
        base.pop("prompt_token_ids", None)
        base.pop("messages", None)
        return kind, _bad_utf8(base, junk)
    elif kind == "oversize":
        base.pop("prompt_token_ids", None)
        base.pop("messages", None)
        base["prompt"] = "o" * draw(st.integers(MAX_JOB_BYTES, 4 * MAX_JOB_BYTES))
    elif kind == "extra_key":
        base[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS))] = 1
    elif kind == "bad_messages":
        base.pop("prompt", None)
        base.pop("prompt_token_ids", None)
        base["messages"] = draw(hostile_messages)
    elif kind == "hostile_schema":
        spec = {"name": "s", "schema": draw(hostile_schemas)}
        base["params"] = {"response_format": {"type": "json_schema", "json_schema": spec}}
    elif kind == "expired":
        base["deadline"] = time.time() - draw(st.floats(1, 1e9))
    return kind, msgpack.packb(base)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


def expects_result(data: bytes) -> bool:
    """The oracle: a job that decodes as a Job for model `demo`, not expired, must run."""
    try:
        job = decode(Job, data, max_bytes=MAX_JOB_BYTES)
    except Exception:
        return False
    return job.model_id == "demo" and (job.deadline is None or job.deadline > time.time() + 60)


def named(msg_id: str, data: bytes) -> str:
    try:
        return decode(Job, data, max_bytes=MAX_JOB_BYTES).job_id
    except Exception:
        return msg_id


@st.composite
def job_batch(draw: st.DrawFn) -> list[tuple[str, str, bytes]]:
    size = draw(st.integers(20, 80))
    return [(f"f{i}", *draw(job_payload(f"f{i}"))) for i in range(size)]


async def _payload_round(
    url: str, tmp: Path, prefix: str, jobs: list[tuple[str, str, bytes]], counts: Counter[str]
) -> None:
    settings = make_settings(
        tmp,
        nats_url=url,
        subject_prefix=prefix,
        ack_wait_s=10,
        max_deliver=3,
        max_job_bytes=MAX_JOB_BYTES,
        shutdown_grace_s=2,
    )
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await provision(js, settings, ["demo"])
        key = NodeKey.generate()
        # named as the node names them: by the payload's job_id once it decodes (a fuzzed
        # job_id may be valid and differ from the message id), else by the message id
        valid = sorted({named(j, data) for j, _, data in jobs if expects_result(data)})
        bad = sorted(named(j, data) for j, _, data in jobs if not expects_result(data))
        for job_id, _, data in jobs:
            await publish_job(js, settings, "demo", data, job_id)
        publisher = Publisher(nc, js, key, settings)
        async with Pipeline(nc, settings, publisher, EchoRuntime(), SERVING) as pipe:

            async def settled() -> bool:
                info = await js.stream_info(settings.stream("JOBS"))
                return info.state.messages == 0 and pipe.in_flight == 0

            await wait_for(settled, timeout=60)
            assert pipe.state is ResourceState.OPEN
            got = await results(js, settings)
            errs = await errors(js, settings)
        assert sorted(r.job_id for r in got) == valid  # one result per job id
        assert all(r.node_id == key.node_id for r in got)
        assert Counter(e.job_id for e in errs) == Counter(bad), "one error event per bad job"
        assert all(not e.retryable and e.node_id == key.node_id for e in errs)
        counts["jobs"] += len(jobs)
        counts["valid_completed"] += len(valid)
        counts["bad_with_one_error"] += len(bad)
        for _, kind, _data in jobs:
            counts[f"kind_{kind}"] += 1
        for e in errs:
            counts[f"code_{e.code.value}"] += 1
        counts["examples"] += 1
    finally:
        await nc.close()


@pytest.mark.nats
@pytest.mark.timeout(600)
def test_fuzzed_jobs_each_get_one_outcome(nats_server: NatsServer, tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    prefixes = (f"fz{n}" for n in itertools.count())

    @settings(max_examples=30, deadline=None, suppress_health_check=SLOW)
    @given(jobs=job_batch())
    def one_round(jobs: list[tuple[str, str, bytes]]) -> None:
        asyncio.run(_payload_round(nats_server.url, tmp_path, next(prefixes), jobs, counts))

    one_round()
    _check_coverage("job payload", counts, JOB_KINDS)
    assert counts["valid_completed"] and counts["bad_with_one_error"], dict(counts)


# -- snapshots --------------------------------------------------------------------------

AUTHORITY = NodeKey.from_seed(b"\x01" * 32)
FORGER = NodeKey.from_seed(b"\x02" * 32)
TRUSTED = frozenset({bytes.fromhex(AUTHORITY.node_id)})
IN_FORCE = 10


def snapshot_body(version: int, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "network": "devnet",
        "version": version,
        "issued_at": 1.0,
        "runtime": {
            "name": "echo",
            "image": "sha256:" + "1" * 64,
            "engine": "echo",
            "engine_args": {},
        },
        "models": [
            {
                "id": "demo",
                "version": "1",
                "sha256": "2" * 64,
                "size": 10,
                "source": "nats-object://rst_models/demo",
                "validation": [],
            }
        ],
    }
    body.update(over)
    return body


GOOD = AUTHORITY.sign(EnvelopeType.CONFIG, snapshot_body(IN_FORCE + 1))
SNAPSHOT_KINDS = [
    "byte_flips",
    "truncated",
    "extended",
    "other_signer",
    "claims_authority_key",
    "rollback",
    "replay",
    "wrong_typ",
    "body_swap",
    "invalid_body",
    "other_network",
    "random_bytes",
]


@st.composite
def forged_snapshot(draw: st.DrawFn) -> tuple[str, bytes, int]:
    """(category, envelope, version in force) that must be rejected."""
    kind = draw(st.sampled_from(SNAPSHOT_KINDS))
    if kind == "byte_flips":
        data = bytearray(GOOD)
        for pos, xor in draw(
            st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), min_size=1)
        ):
            data[pos] ^= xor
        if bytes(data) == GOOD:
            data[0] ^= 1
        return kind, bytes(data), IN_FORCE
    if kind == "truncated":
        return kind, GOOD[: draw(st.integers(0, len(GOOD) - 1))], IN_FORCE
    if kind == "extended":
        return kind, GOOD + draw(st.binary(min_size=1, max_size=64)), IN_FORCE
    version = draw(st.integers(IN_FORCE + 1, 1 << 40))
    mutated = snapshot_body(
        version,
        runtime={
            "name": "evil",
            "image": "sha256:" + draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
            "engine": draw(st.sampled_from(["echo", "vllm"])),
            "engine_args": {},
        },
    )
    if kind == "other_signer":
        return kind, FORGER.sign(EnvelopeType.CONFIG, mutated), IN_FORCE
    if kind == "claims_authority_key":
        body = msgpack.packb(mutated)
        sig = FORGER.sign_bytes(EnvelopeType.CONFIG, body)
        forged = msgpack.unpackb(sig)
        env = pack_envelope("config", body, bytes.fromhex(AUTHORITY.node_id), forged["sig"])
        return kind, env, IN_FORCE
    if kind == "rollback":
        old = draw(st.integers(-5, IN_FORCE))
        return kind, AUTHORITY.sign(EnvelopeType.CONFIG, snapshot_body(old)), IN_FORCE
    if kind == "replay":
        return kind, GOOD, draw(st.integers(IN_FORCE + 1, 1 << 40))
    if kind == "wrong_typ":
        typ = draw(st.sampled_from([EnvelopeType.RESULT, EnvelopeType.ERROR, EnvelopeType.EVENT]))
        return kind, AUTHORITY.sign(typ, mutated | {"node_id": AUTHORITY.node_id}), IN_FORCE
    if kind == "body_swap":
        env = msgpack.unpackb(GOOD)
        env["body"] = msgpack.packb(mutated)
        return kind, msgpack.packb(env, use_bin_type=True), IN_FORCE
    if kind == "other_network":
        network = draw(
            st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True).filter(lambda n: n != "devnet")
        )
        return (
            kind,
            AUTHORITY.sign(EnvelopeType.CONFIG, snapshot_body(version, network=network)),
            IN_FORCE,
        )
    if kind == "invalid_body":
        field = draw(
            st.sampled_from(["network", "version", "issued_at", "runtime", "models", "extra"])
        )
        broken = snapshot_body(version) | {field: draw(msgpack_values)}
        return kind, AUTHORITY.sign(EnvelopeType.CONFIG, broken), IN_FORCE
    return kind, draw(st.binary(max_size=600)), IN_FORCE


def test_forged_or_rolled_back_snapshots_are_never_accepted() -> None:
    counts: Counter[str] = Counter()

    @settings(max_examples=1000, deadline=None, suppress_health_check=SLOW)
    @given(case=forged_snapshot())
    def one_case(case: tuple[str, bytes, int]) -> None:
        kind, data, in_force = case
        counts[f"kind_{kind}"] += 1
        accepted: Snapshot | None = None
        try:
            accepted, _ = check_snapshot(data, TRUSTED, network="devnet", floor=in_force)
        except ConfigRejected:
            pass
        if kind == "invalid_body" and accepted is not None:
            # a drawn value that happens to be valid for its field is an honest snapshot
            counts["invalid_body_valid_by_chance"] += 1
            return
        assert accepted is None, (kind, accepted)
        counts["rejected"] += 1

    one_case()
    _check_coverage("snapshot", counts, SNAPSHOT_KINDS)


def test_the_unforged_snapshot_is_accepted() -> None:
    """The snapshot fuzzer's oracle is sound: what it mutates passes untouched."""
    assert (
        check_snapshot(GOOD, TRUSTED, network="devnet", floor=IN_FORCE)[0].version == IN_FORCE + 1
    )


# -- model bytes ------------------------------------------------------------------------

MODEL = hashlib.sha256(b"seed").digest() * 700  # 22,400 bytes, several 4 KiB chunks
MODEL_SPEC = ModelSpec.model_validate(
    {
        "id": "m1",
        "version": "1",
        "sha256": hashlib.sha256(MODEL).hexdigest(),
        "size": len(MODEL),
        "source": "nats-object://rst_models/m1",
    }
)
MODEL_KINDS = ["flips", "truncated", "extended", "replaced", "mixed"]


@st.composite
def tampered_model(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(MODEL_KINDS))
    data = bytearray(MODEL)
    if kind in ("flips", "mixed"):
        for pos, xor in draw(
            st.lists(st.tuples(st.integers(0, len(MODEL) - 1), st.integers(1, 255)), min_size=1)
        ):
            data[pos] ^= xor
    if kind in ("truncated", "mixed"):
        del data[draw(st.integers(0, len(data) - 1)) :]
    if kind == "extended":
        data += draw(st.binary(min_size=1, max_size=5000))
    if kind == "replaced":
        data = bytearray(random.Random(draw(st.integers())).randbytes(len(MODEL)))
    if bytes(data) == MODEL:
        data[-1] ^= 1
    return kind, bytes(data)


async def _fetch_tampered(
    url: str, tmp: Path, kind: str, data: bytes, counts: Counter[str]
) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        path = tmp / "upload"
        path.write_bytes(data)
        await objectstore.put_file(js, "rst_models", "m1", path, chunk_size=4096)
        store = ModelStore(tmp / "cache", js=js, attempts=1, backoff_s=0.01, idle_timeout_s=5)
        with pytest.raises(ModelInvalid):
            await store.fetch(MODEL_SPEC)
        assert store.cached() == set()
        assert not store.blob_path(MODEL_SPEC.sha256).exists()
        assert list((store.cache_dir / "tmp").iterdir()) == []
        counts[f"kind_{kind}"] += 1
        counts["rejected"] += 1
    finally:
        await nc.close()


@pytest.mark.nats
@pytest.mark.timeout(300)
def test_tampered_model_bytes_are_never_returned(nats_server: NatsServer, tmp_path: Path) -> None:
    counts: Counter[str] = Counter()

    @settings(max_examples=100, deadline=None, suppress_health_check=SLOW)
    @given(case=tampered_model())
    def one_case(case: tuple[str, bytes]) -> None:
        asyncio.run(_fetch_tampered(nats_server.url, tmp_path, *case, counts))

    one_case()
    _check_coverage("model bytes", counts, MODEL_KINDS)


@pytest.mark.nats
async def test_the_untampered_model_fetches(nats_server: NatsServer, tmp_path: Path) -> None:
    """The model fuzzer's oracle is sound: the bytes it tampers with fetch untouched."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        (tmp_path / "good").write_bytes(MODEL)
        await objectstore.put_file(js, "rst_models", "m1", tmp_path / "good", chunk_size=4096)
        store = ModelStore(tmp_path / "cache", js=js, attempts=1)
        blob = await store.fetch(MODEL_SPEC)
        assert blob.read_bytes() == MODEL
    finally:
        await nc.close()
