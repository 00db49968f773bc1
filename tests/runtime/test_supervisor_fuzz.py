"""Runtime frames v2 fuzzed against the supervisor: hypothesis writes a script of answers
(garbage, truncated, oversized, wrong ids, done twice, partials nobody asked for, bad fields
in done/failed, split writes) that `tests/support/fuzz_runtime.py` plays request by request.
The supervisor never crashes, every request gets exactly one outcome of the kind the plan
implies, and a runtime that breaks the protocol is replaced."""

import asyncio
import itertools
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from schemas import frames
from tests.support.polling import wait_for
from worker.core.errors import (
    BadRequest,
    DeadlineExceeded,
    ItemFailed,
    NodeError,
    OutputMalformed,
    RuntimeFailure,
)
from worker.core.settings import Settings
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.process import ProcessBackend
from worker.runtime.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = [sys.executable, str(ROOT / "tests" / "support" / "fuzz_runtime.py")]
MAX_FRAME = 64 * 1024

# kinds after which the runtime must have been replaced
VIOLATIONS = {
    "raw",
    "frame",
    "wrong_id",
    "truncated",
    "oversized",
    "fatal",
    "exit",
    "failed_bad",
    "partial_unasked",
    "done_twice",
}
FAILED_CODES = {"bad_request": BadRequest, "engine": ItemFailed, "deadline": DeadlineExceeded}

# integers msgpack can carry (its int64/uint64 range), and the negative ones among them
msgpack_ints = st.integers(-(1 << 63), (1 << 64) - 1)
negative_ints = st.integers(-(1 << 63), -1)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# fields that make a `done` malformed (OutputMalformed for that job, the runtime stays)
bad_done_fields = st.one_of(
    st.fixed_dictionaries({"text": msgpack_ints | st.none() | st.binary(max_size=8)}),
    st.fixed_dictionaries({"token_ids": st.lists(negative_ints, min_size=1)}),
    st.fixed_dictionaries({"token_ids": st.lists(st.booleans() | st.text(), min_size=1)}),
    st.fixed_dictionaries({"token_ids": msgpack_values.filter(lambda v: not isinstance(v, list))}),
    st.fixed_dictionaries(
        {"finish_reason": st.text(max_size=10).filter(lambda s: s not in ("stop", "length"))}
    ),
    st.fixed_dictionaries({"prompt_tokens": negative_ints | st.booleans()}),
    st.fixed_dictionaries({"first_token_s": st.floats(max_value=-0.001) | st.text(max_size=3)}),
    st.fixed_dictionaries({"logprobs": msgpack_ints | st.lists(msgpack_ints, min_size=1)}),
)

# a `failed` frame that breaks the protocol
bad_failed_fields = st.one_of(
    st.fixed_dictionaries(
        {
            "code": msgpack_values.filter(
                lambda v: not isinstance(v, str) or v not in {*FAILED_CODES, "aborted"}
            )
        }
    ),
    st.fixed_dictionaries({"code": st.just("engine"), "reason": msgpack_ints | st.none()}),
    st.just({"code": "aborted", "reason": "not asked to"}),
)

agent_kinds = ["ready", "pong", "partial", "done", "failed", "nope", ""]


def plan_strategy() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.just({"kind": "ok"}),
        st.builds(lambda s: {"kind": "split", "step": s}, st.integers(1, 40)),
        st.builds(lambda f: {"kind": "done_bad", "fields": f}, bad_done_fields),
        st.builds(
            lambda c, r: {"kind": "failed", "code": c, "reason": r},
            st.sampled_from(sorted(FAILED_CODES)),
            st.text(max_size=30),
        ),
        st.builds(lambda f: {"kind": "failed_bad", "fields": f}, bad_failed_fields),
        st.just({"kind": "done_twice"}),
        st.just({"kind": "partial_unasked"}),
        st.builds(
            lambda d: {"kind": "wrong_id", "delta": d},
            st.integers(-3, 1000).filter(lambda d: d != 0),
        ),
        st.builds(
            lambda data, e: {"kind": "raw", "data": data, "exit": e},
            st.binary(min_size=1, max_size=200),
            st.booleans(),
        ),
        st.builds(
            lambda v: {"kind": "frame", "value": v},
            msgpack_values
            | st.fixed_dictionaries(
                {"t": st.sampled_from(agent_kinds) | msgpack_values},
                optional={
                    "id": negative_ints
                    | st.integers(min_value=1 << 40, max_value=(1 << 64) - 1)
                    | msgpack_values.filter(lambda v: type(v) is not int)
                },
            ),
        ),
        st.builds(
            lambda p, e: {"kind": "truncated", "percent": p, "exit": e},
            st.integers(1, 99),
            st.booleans(),
        ),
        st.builds(
            lambda s: {"kind": "oversized", "size": s}, st.integers(MAX_FRAME, 4 * MAX_FRAME)
        ),
        st.builds(lambda m: {"kind": "fatal", "message": m}, st.text(max_size=30)),
        st.builds(lambda c: {"kind": "exit", "code": c}, st.integers(0, 255)),
    )


def _settings() -> Settings:
    return Settings(
        runtime_ready_timeout_s=20,
        request_timeout_s=3.0,
        runtime_write_timeout_s=3.0,
        ping_interval_s=600,
        ping_timeout_s=2,
        runtime_stop_timeout_s=0.5,
        runtime_max_frame_bytes=MAX_FRAME,
    )


def _check(plan: dict[str, Any], item: WorkItem, outcome: Any) -> None:
    assert isinstance(outcome, Completion | NodeError), outcome
    kind = plan["kind"]
    if kind in ("ok", "split"):
        assert isinstance(outcome, Completion), (plan, outcome)
        assert outcome.job_id == item.job_id and outcome.text == item.request["prompt"]
    elif kind == "done_twice":
        assert isinstance(outcome, Completion), (plan, outcome)  # the first was fine
    elif kind in VIOLATIONS:
        assert isinstance(outcome, RuntimeFailure) and outcome.retryable, (plan, outcome)
    elif kind == "done_bad":
        assert isinstance(outcome, OutputMalformed), (plan, outcome)
    elif kind == "failed":
        assert isinstance(outcome, FAILED_CODES[plan["code"]]), (plan, outcome)
        assert not outcome.retryable


async def _play(plans: list[dict[str, Any]], tmp: Path, counts: Counter[str]) -> None:
    plans_file, index_file = tmp / "plans.msgpack", tmp / "index"
    plans_file.write_bytes(msgpack.packb(plans, use_bin_type=True))
    index_file.write_text("0")
    backend = ProcessBackend(
        _settings(),
        command=RUNTIME,
        extra_env={"RST_FUZZ_PLANS": str(plans_file), "RST_FUZZ_INDEX": str(index_file)},
    )
    spec = LaunchSpec("fuzz", "local", tmp, "", {})
    ids = itertools.count()
    async with Supervisor(_settings(), backend, spec) as sup:
        for i, plan in enumerate(plans):
            item = WorkItem(f"j{next(ids)}", {"prompt": f"p{i}", "params": {}})
            restarts = sup.stats().restarts
            try:
                outcome: Any = await sup.generate(item)
            except NodeError as exc:
                outcome = exc
            _check(plan, item, outcome)
            if plan["kind"] in VIOLATIONS:
                await _replaced(sup, restarts)
                counts["runtime_replaced"] += 1
            else:
                assert sup.stats().restarts == restarts, plan
            counts[f"plan_{plan['kind']}"] += 1
            counts["requests"] += 1
        assert sup.is_open


async def _replaced(sup: Supervisor, restarts: int) -> None:
    """The runtime is replaced at once, or (done_twice) as soon as its next frame arrives."""
    await wait_for(lambda: sup.stats().restarts > restarts, 10, interval=0.01)


@pytest.mark.timeout(900)
def test_supervisor_survives_fuzzed_frames(tmp_path_factory: pytest.TempPathFactory) -> None:
    counts: Counter[str] = Counter()

    @settings(
        max_examples=40,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(plans=st.lists(plan_strategy(), min_size=1, max_size=8))
    # a malformed `failed` frame once left its request out of the session's failure
    @example(plans=[{"kind": "failed_bad", "fields": {"code": None}}])
    def run(plans: list[dict[str, Any]]) -> None:
        tmp = tmp_path_factory.mktemp("fuzz-frames")
        # every outcome is due within request_timeout_s and a ping's ping_timeout_s (a
        # request past its run time is aborted alone, or with its runtime if no pong comes):
        # a wait past that is a hang
        asyncio.run(asyncio.wait_for(_play(plans, tmp, counts), 60))
        counts["examples"] += 1

    run()
    assert counts["examples"] >= 40, counts
    assert counts["runtime_replaced"] > 0 and counts["plan_ok"] + counts["plan_split"] > 0, counts


def test_fuzz_runtime_speaks_frames() -> None:
    """The puppet's own frames are valid when the plan says ok (guards the fuzzer)."""
    from tests.support.fuzz_runtime import done_frame

    packed = frames.pack(done_frame(1, "t"))
    decoded = frames.FrameDecoder(frames.TO_AGENT).feed(packed)
    assert frames.parse_done(decoded[0])["text"] == "t"
