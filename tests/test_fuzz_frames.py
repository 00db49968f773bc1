"""Runtime frames fuzzed against the supervisor: hypothesis writes a script of answers
(garbage, truncated, oversized, wrong ids, wrong types in result items, split writes) that
`tests/chaos/fuzz_runtime.py` plays batch by batch. The supervisor never crashes, every
batch gets one outcome per item, and a runtime that breaks the protocol is replaced."""

import asyncio
import itertools
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas import frames
from worker.core.errors import ItemFailed, NodeError, OutputMalformed, RuntimeFailure
from worker.core.settings import Settings
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.process import ProcessBackend
from worker.runtime.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = [sys.executable, str(ROOT / "tests" / "chaos" / "fuzz_runtime.py")]
MAX_FRAME = 64 * 1024
COUNTS: Counter[str] = Counter()

# kinds after which the runtime must have been replaced
VIOLATIONS = {"raw", "frame", "wrong_id", "truncated", "oversized", "fatal", "exit"}

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# a result item that must come back as OutputMalformed / ItemFailed, never a Completion
bad_entry = st.one_of(
    st.fixed_dictionaries({"text": st.integers() | st.none() | st.binary(max_size=8)}),
    st.fixed_dictionaries({"token_ids": st.lists(st.integers(max_value=-1), min_size=1)}),
    st.fixed_dictionaries({"token_ids": st.lists(st.booleans() | st.text(), min_size=1)}),
    st.fixed_dictionaries({"token_ids": msgpack_values.filter(lambda v: not isinstance(v, list))}),
    st.fixed_dictionaries(
        {"finish_reason": st.text(max_size=10).filter(lambda s: s not in ("stop", "length"))}
    ),
    st.fixed_dictionaries({"prompt_tokens": st.integers(max_value=-1) | st.booleans()}),
    st.fixed_dictionaries({"error": st.text(max_size=50)}),
    st.fixed_dictionaries({"error": st.integers() | st.none() | st.binary(max_size=4)}),
)


def plan_strategy() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.just({"kind": "ok"}),
        st.builds(lambda s: {"kind": "split", "step": s}, st.integers(1, 40)),
        st.builds(
            lambda r, d, x: {"kind": "items", "replace": r, "drop": d, "extra": x},
            st.dictionaries(st.integers(0, 7), bad_entry, max_size=4),
            st.lists(st.integers(0, 7), max_size=2),
            st.lists(
                st.fixed_dictionaries({"job_id": st.text(max_size=6)}) | msgpack_values,
                max_size=2,
            ),
        ),
        st.builds(
            lambda v: {"kind": "items_value", "value": v},
            msgpack_values.filter(lambda v: not isinstance(v, list)),
        ),
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
            | st.dictionaries(st.sampled_from(["t", "id", "x"]), msgpack_values, max_size=3).filter(
                lambda d: d.get("t") != "result"
            )
            | st.fixed_dictionaries(
                {"t": st.sampled_from(["ready", "pong", "batch", "nope", ""])},
                optional={"id": st.integers()},
            )
            | st.just({"t": "result", "id": "1", "items": []}),
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
        ping_interval_s=600,
        ping_timeout_s=5,
        runtime_stop_timeout_s=0.5,
        runtime_max_frame_bytes=MAX_FRAME,
    )


def _check(plan: dict[str, Any], items: list[WorkItem], outcomes: list[Any]) -> None:
    assert len(outcomes) == len(items)
    assert all(isinstance(o, Completion | NodeError) for o in outcomes), outcomes
    kind = plan["kind"]
    if kind in ("ok", "split"):
        assert all(isinstance(o, Completion) for o in outcomes), (plan, outcomes)
        for item, out in zip(items, outcomes, strict=True):
            assert out.job_id == item.job_id and out.text == item.payload["prompt"]
    elif kind in VIOLATIONS:
        assert all(isinstance(o, RuntimeFailure) and o.retryable for o in outcomes), (
            plan,
            outcomes,
        )
    elif kind == "items_value":
        assert all(isinstance(o, OutputMalformed) for o in outcomes), outcomes
    elif kind == "items":
        replaced = {int(i) for i in plan["replace"]}
        dropped = {int(i) for i in plan["drop"]}
        extra_ids = {e.get("job_id") for e in plan["extra"] if isinstance(e, dict)}
        for i, (item, out) in enumerate(zip(items, outcomes, strict=True)):
            if i in dropped or item.job_id in extra_ids:
                assert isinstance(out, OutputMalformed), (plan, out)
            elif i in replaced:
                assert isinstance(out, OutputMalformed | ItemFailed), (plan, out)
            else:
                assert isinstance(out, Completion), (plan, out)


async def _play(plans: list[dict[str, Any]], sizes: list[int], tmp: Path) -> None:
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
        for plan, size in zip(plans, sizes, strict=True):
            items = [
                WorkItem(f"j{next(ids)}", {"prompt": f"p{i}", "params": {}}) for i in range(size)
            ]
            restarts = sup.stats().restarts
            outcomes = await sup.run(items)
            _check(plan, items, outcomes)
            if plan["kind"] in VIOLATIONS:
                assert sup.stats().restarts > restarts, plan
                COUNTS["runtime_replaced"] += 1
            COUNTS["batches"] += 1
            COUNTS[f"plan_{plan['kind']}"] += 1
            COUNTS["items"] += len(items)
            COUNTS["completions"] += sum(isinstance(o, Completion) for o in outcomes)
        # after all that, a plain batch still works (the plan list wraps to an "ok")
        assert sup.state.value == "open"


@pytest.mark.timeout(600)
@settings(
    max_examples=60,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plans=st.lists(plan_strategy(), min_size=1, max_size=8),
    sizes=st.lists(st.integers(1, 8), min_size=8, max_size=8),
)
def test_supervisor_survives_fuzzed_frames(
    plans: list[dict[str, Any]], sizes: list[int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz-frames")
    asyncio.run(_play(plans, sizes[: len(plans)], tmp))
    COUNTS["examples"] += 1


def test_fuzz_frames_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the case counts of the fuzz run above (runs after it, in file order)."""
    with capsys.disabled():
        print(f"\nframe fuzz counts: {dict(sorted(COUNTS.items()))}")  # noqa: T201
    assert COUNTS["batches"] > 0 or not COUNTS, COUNTS


def test_fuzz_runtime_speaks_frames() -> None:
    """The puppet's own frames are valid when the plan says ok (guards the fuzzer)."""
    packed = frames.pack(frames.result(1, [frames.ok("a", "t", [1], "stop", 1)]))
    decoded = frames.FrameDecoder(frames.TO_AGENT).feed(packed)
    assert decoded[0]["t"] == "result"
