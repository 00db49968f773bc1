"""The runtime process (`python -m containers.runtime`) with the echo engine, as a subprocess:
frames in on stdin, frames out on stdout: requests joining and leaving a running engine,
streaming, abort, deadlines, pings while generating, and every injected fault."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from schemas import frames
from schemas.frames import Frame, FrameError
from schemas.limits import MAX_NEW_TOKENS
from tests.support.framepipe import FramePipe

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("done", "failed")


class RuntimeProcess(FramePipe):
    def __init__(self, model_dir: Path, **env: str) -> None:
        self.max_frame_bytes = int(env.get("RESULTITY_MAX_FRAME_BYTES", frames.MAX_FRAME_BYTES))
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "RESULTITY_ENGINE": "echo",
            "RESULTITY_MODEL_DIR": str(model_dir),
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "containers.runtime"],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        super().__init__(proc, max_frame_bytes=self.max_frame_bytes)
        self.seen: list[Frame] = []

    def ready(self) -> Frame:
        frame = self.receive()
        assert frame["t"] == "ready", frame
        return frame

    def next(self, timeout: float = 10.0) -> Frame:
        frame = self.receive(timeout)
        self.seen.append(frame)
        return frame

    def until(self, kind: str, request_id: int | None = None) -> Frame:
        """Frames up to the first of `kind` (for `request_id`); all kept in `seen`."""
        while True:
            frame = self.next()
            if frame["t"] == kind and (request_id is None or frame.get("id") == request_id):
                return frame

    def outcome(self, request_id: int) -> Frame:
        for frame in self.seen:
            if frame["t"] in TERMINAL and frame["id"] == request_id:
                return frame
        while True:
            frame = self.next()
            if frame["t"] in TERMINAL and frame["id"] == request_id:
                return frame

    def run(
        self, *requests: dict[str, Any], stream: bool = False, first_id: int = 1
    ) -> list[Frame]:
        ids = list(range(first_id, first_id + len(requests)))
        for request_id, request in zip(ids, requests, strict=True):
            self.send(frames.submit(request_id, request, stream=stream))  # type: ignore[arg-type]
        return [self.outcome(i) for i in ids]

    def partials(self, request_id: int) -> list[Frame]:
        return [f for f in self.seen if f["t"] == "partial" and f["id"] == request_id]

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        """Read the runtime's stderr up to a line holding `text` (an event it logs)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line:
                break
            if text in line:
                return
        raise AssertionError(f"the runtime never logged {text!r}")

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (model / "sub" / "config.json").write_text('{"echo": true}')
    return model


@pytest.fixture
def spawn(model_dir: Path) -> Iterator[Any]:
    started: list[RuntimeProcess] = []

    def start(**env: str) -> RuntimeProcess:
        runtime = RuntimeProcess(model_dir, **env)
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        runtime.close()


def slow(ms: float = 5) -> dict[str, str]:
    return {"RESULTITY_ENGINE_ARGS": f'{{"token_delay_ms": {ms}}}'}


def req(prompt: str = "hello", **params: Any) -> dict[str, Any]:
    return {"prompt": prompt, "params": params}


def test_ready_reports_facts(spawn: Any) -> None:
    rt = spawn(RESULTITY_MODEL_SHA256="ab" * 32, RESULTITY_DEVICE="test-device")
    assert rt.ready() == frames.ready(
        engine="echo",
        engine_version="echo-2",
        model_sha256="ab" * 32,
        device="test-device",
        max_active=256,
    )


def test_each_request_is_answered(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    requests = [req(f"prompt {i}", max_tokens=5 + i, seed=i) for i in range(10)]
    requests.append({"prompt_token_ids": [1, 2, 3], "params": {}})
    requests.append({"messages": [{"role": "user", "content": "hi"}], "params": {}})
    outcomes = rt.run(*requests)
    assert [o["t"] for o in outcomes] == ["done"] * 12
    for i, outcome in enumerate(outcomes[:10]):
        assert len(outcome["token_ids"]) == 5 + i
        assert all(0 <= t < 50000 for t in outcome["token_ids"])
        assert outcome["finish_reason"] == "length"
        assert outcome["prompt_tokens"] == len(f"prompt {i}".encode())
        assert outcome["text"] and outcome["first_token_s"] >= 0
    assert len(outcomes[10]["token_ids"]) == 16 and outcomes[10]["prompt_tokens"] == 3
    assert outcomes[11]["prompt_tokens"] == len(b"user: hi")


def test_short_request_finishes_before_a_long_one_that_started_first(spawn: Any) -> None:
    rt = spawn(**slow(2))
    rt.ready()
    rt.send(frames.submit(1, req("long", max_tokens=400), stream=True))  # type: ignore[arg-type]
    rt.until("partial", 1)  # the long one is generating
    rt.send(frames.submit(2, req("short", max_tokens=3)))  # type: ignore[arg-type]
    rt.outcome(1)
    finished = [f["id"] for f in rt.seen if f["t"] == "done"]
    assert finished == [2, 1]


def test_streamed_tokens_concatenate_to_the_result(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    done = rt.run(req("stream me", max_tokens=12), req("quiet", max_tokens=12), stream=True)
    for request_id, outcome in zip((1, 2), done, strict=True):
        parts = rt.partials(request_id)
        assert len(parts) == 11  # one per step; the last token comes with `done`
        streamed = [t for p in parts for t in p["token_ids"]]
        assert streamed == outcome["token_ids"][: len(streamed)]
        assert outcome["text"].startswith("".join(p["text"] for p in parts))
    assert not rt.partials(3)
    plain = rt.run(req("no stream", max_tokens=12), first_id=3)[0]
    assert plain["t"] == "done" and not rt.partials(3)


def test_output_is_deterministic_alone_and_among_others(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    alone = rt.run(req("same", seed=7))[0]
    crowd = [req(f"other {i}", seed=i, max_tokens=1 + i) for i in range(31)]
    crowd.insert(13, req("same", seed=7))
    among = rt.run(*crowd, first_id=100)[13]
    assert alone["token_ids"] == among["token_ids"] and alone["text"] == among["text"]
    reseeded = rt.run(req("same", seed=8), first_id=200)[0]
    assert reseeded["token_ids"] != alone["token_ids"]


def test_output_depends_on_the_model_bytes(spawn: Any, model_dir: Path) -> None:
    first = spawn()
    hash_before = first.ready()["model_sha256"]
    before = first.run(req())[0]
    (model_dir / "weights.bin").write_bytes(b"other weights")
    second = spawn()
    assert second.ready()["model_sha256"] != hash_before
    assert second.run(req())[0]["token_ids"] != before["token_ids"]


def test_stop_string_ends_the_output(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    full = rt.run(req(max_tokens=8))[0]
    third_word = full["text"].split()[2]
    stopped = rt.run(req(max_tokens=8, stop=[third_word]), first_id=2)[0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["token_ids"] == full["token_ids"][: len(stopped["token_ids"])]
    assert len(stopped["token_ids"]) <= 3


def test_invalid_request_fails_alone(spawn: Any) -> None:
    """The job schema's bounds, checked again in the runtime by the same parser."""
    rt = spawn()
    rt.ready()
    outcomes = rt.run(
        req("good"),
        {"prompt": "a", "prompt_token_ids": [1], "params": {}},
        req("bad-temp", temperature=9),
        req("bad-max", max_tokens=0),
        req("huge-max", max_tokens=(1 << 20) + 1),
        req("many-stops", stop=["x"] * 17),
        {"prompt_token_ids": [-1], "params": {}},
        {"messages": [{"role": "robot", "content": "x"}], "params": {}},
        req("!fault:bad_request"),
    )
    assert outcomes[0]["t"] == "done"
    assert [(o["t"], o["code"]) for o in outcomes[1:]] == [("failed", "bad_request")] * 8


def test_abort_stops_a_running_request(spawn: Any) -> None:
    rt = spawn(**slow(5))
    rt.ready()
    rt.send(frames.submit(1, req("long", max_tokens=100_000), stream=True))  # type: ignore[arg-type]
    rt.send(frames.submit(2, req("other", max_tokens=100_000), stream=True))  # type: ignore[arg-type]
    rt.until("partial", 1)
    rt.send(frames.abort(1))
    assert rt.outcome(1) == frames.failed(1, frames.FailCode.ABORTED, "aborted")
    rt.send(frames.abort(1))  # no longer running: ignored
    rt.send(frames.abort(99))  # never ran: ignored
    rt.send(frames.ping(5))
    rt.until("pong")
    assert [f["t"] for f in rt.seen if f.get("id") == 1][-1] == "failed"
    rt.send(frames.abort(2))
    assert rt.outcome(2)["code"] == "aborted"


def test_deadline_passing_mid_run_ends_the_request(spawn: Any) -> None:
    rt = spawn(**slow(5))
    rt.ready()
    rt.send(
        frames.submit(1, req("long", max_tokens=100_000), stream=True, deadline=time.time() + 0.3)  # type: ignore[arg-type]
    )
    rt.send(frames.submit(2, req("late", max_tokens=5), deadline=time.time() - 1))  # type: ignore[arg-type]
    assert rt.outcome(2)["code"] == "deadline"
    rt.until("partial", 1)  # it was running
    failed = rt.outcome(1)
    assert failed["t"] == "failed" and failed["code"] == "deadline"


def test_pings_are_answered_while_generating(spawn: Any) -> None:
    rt = spawn(**slow(5))
    rt.ready()
    rt.send(frames.submit(1, req("long", max_tokens=200), stream=True))  # type: ignore[arg-type]
    rt.until("partial", 1)
    rt.send(frames.ping(42))
    pong = rt.until("pong")
    assert frames.parse_pong(pong) == frames.pong(
        42, {"running": 1, "waiting": 0, "kv_cache_usage": 1 / 256}
    ), "the pong carries the engine's figures: one request of 256 slots"
    assert not [f for f in rt.seen if f["t"] == "done"], "the pong waited for the request"


def test_ping_pong_and_shutdown(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.ping(42))
    assert rt.receive() == frames.pong(42, {"running": 0, "waiting": 0, "kv_cache_usage": 0.0})
    rt.send(frames.shutdown())
    assert rt.wait() == 0
    with pytest.raises(EOFError):
        rt.receive()


def test_fault_error_fails_only_that_request(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    outcomes = rt.run(req("a"), req("!fault:error"), req("c"))
    assert outcomes[0]["t"] == "done" and outcomes[2]["t"] == "done"
    assert outcomes[1] == frames.failed(2, frames.FailCode.ENGINE, "injected error (echo fault)")


def test_fault_crash_exits(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.submit(1, req("a")))  # type: ignore[arg-type]
    rt.send(frames.submit(2, req("!fault:crash")))  # type: ignore[arg-type]
    with pytest.raises(EOFError):
        while True:
            rt.next()
    assert rt.wait() == 3


def test_fault_hang_stops_mid_generation(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.submit(1, req("!fault:hang", max_tokens=10), stream=True))  # type: ignore[arg-type]
    assert len([rt.until("partial", 1), rt.until("partial", 1)]) == 2
    rt.wait_log("echo_fault_hanging")
    rt.send(frames.ping(1))
    with pytest.raises(TimeoutError):
        rt.receive(timeout=1.0)
    assert rt.proc.poll() is None


def test_fault_garbage_breaks_the_stream(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.submit(1, req("!fault:garbage")))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        rt.receive()


def test_fault_oversize_frame(spawn: Any) -> None:
    rt = spawn(RESULTITY_MAX_FRAME_BYTES="65536")
    rt.ready()
    rt.send(frames.submit(1, req("!fault:oversize")))  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="larger than 65536"):
        for _ in range(10):
            rt.receive()


@pytest.mark.parametrize(
    ("fault", "kinds"),
    [
        ("unknown_id", [("partial", 1_000_001)]),
        ("done_twice", [("done", 1), ("done", 1)]),
        ("out_of_order", [("done", 1), ("partial", 1)]),
    ],
)
def test_protocol_faults_are_injected(spawn: Any, fault: str, kinds: list[Any]) -> None:
    """The faults the supervisor tests rely on come out as described."""
    rt = spawn()
    rt.ready()
    rt.send(frames.submit(1, req(f"!fault:{fault}"), stream=True))  # type: ignore[arg-type]
    got = [rt.next() for _ in kinds]
    assert [(f["t"], f["id"]) for f in got] == kinds


def test_fault_endless_streams_past_max_tokens(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.submit(1, req("!fault:endless", max_tokens=2), stream=True))  # type: ignore[arg-type]
    parts = [rt.until("partial", 1) for _ in range(5)]
    assert sum(len(p["token_ids"]) for p in parts) > 2


@pytest.mark.parametrize(
    "env",
    [{"RESULTITY_ECHO_FAULT": "noready"}, {"RESULTITY_ENGINE_ARGS": '{"fault": "noready"}'}],
)
def test_fault_noready(spawn: Any, env: dict[str, str]) -> None:
    rt = spawn(**env)
    with pytest.raises(TimeoutError):
        rt.receive(timeout=1.0)
    assert rt.proc.poll() is None


@pytest.mark.parametrize(
    "raw",
    [
        b"hello world\n",
        frames.pack({"t": "bogus"}),
        msgpack.packb([1, 2, 3]),
        frames.pack({"t": ["submit"], "id": 1}),
        frames.pack({"t": "submit", "id": [1], "request": {}}),
        frames.pack({"t": "submit", "id": "one", "request": {}}),
        frames.pack({"t": "submit", "id": 1, "request": {"prompt": "x"}, "stream": "yes"}),
        frames.pack({"t": "abort"}),
        frames.pack({"t": "ping", "id": 1, "x": [[[[[[[[[[1]]]]]]]]]]}),
        frames.pack({"t": "submit", "id": 1, "request": {"prompt": "x"}, "extra": 1}),
    ],
    ids=[
        "garbage",
        "unknown-type",
        "not-a-map",
        "type-is-a-list",
        "id-is-a-list",
        "id-is-a-string",
        "stream-not-bool",
        "abort-without-id",
        "too-deep",
        "unknown-key",
    ],
)
def test_malformed_input_is_fatal(spawn: Any, raw: bytes) -> None:
    rt = spawn()
    rt.ready()
    rt.send_raw(raw)
    frame = rt.receive()
    assert frame["t"] == "fatal" and "bad input frame" in frame["message"]
    assert rt.wait() == 1


def test_duplicate_running_id_is_fatal(spawn: Any) -> None:
    rt = spawn(**slow(5))
    rt.ready()
    rt.send(frames.submit(1, req("long", max_tokens=100_000), stream=True))  # type: ignore[arg-type]
    rt.until("partial", 1)
    rt.send(frames.submit(1, req("again")))  # type: ignore[arg-type]
    frame = rt.until("fatal")
    assert "running" in frame["message"]
    assert rt.wait() == 1


def test_an_output_over_the_frame_limit_fails_that_request_alone(spawn: Any) -> None:
    """The job of death, second layer: a `done` too large for the agent's frame limit would
    break the runtime there (and every request on it); it fails its own request instead."""
    rt = spawn(RESULTITY_MAX_FRAME_BYTES="4096")
    rt.ready()
    big, small = rt.run(req("big", max_tokens=2000), req("small", max_tokens=4))
    assert big["t"] == "failed" and big["code"] == "bad_request", big
    assert "over the frame limit of 4096" in big["reason"]
    assert small["t"] == "done" and len(small["token_ids"]) == 4
    (after,) = rt.run(req("after", max_tokens=4), first_id=3)
    assert after["t"] == "done" and rt.proc.poll() is None


def test_a_request_above_the_output_limit_is_refused(spawn: Any) -> None:
    """The job of death, first layer, on the runtime's side: more tokens than a result can
    carry is a bad request, refused before the engine runs it."""
    rt = spawn()
    rt.ready()
    (refused,) = rt.run(req("huge", max_tokens=MAX_NEW_TOKENS + 1))
    assert refused["t"] == "failed" and refused["code"] == "bad_request"
    assert "max_tokens" in refused["reason"] and str(MAX_NEW_TOKENS) in refused["reason"]
    (after,) = rt.run(req("after", max_tokens=4), first_id=2)
    assert after["t"] == "done"


def test_oversized_input_is_fatal(spawn: Any) -> None:
    rt = spawn(RESULTITY_MAX_FRAME_BYTES="4096")
    rt.ready()
    rt.send(frames.submit(1, req("x" * 10000)))  # type: ignore[arg-type]
    frame = rt.receive()
    assert frame["t"] == "fatal" and "larger than 4096" in frame["message"]
    assert rt.wait() == 1


def test_missing_model_is_fatal_at_start(spawn: Any, tmp_path: Path) -> None:
    rt = spawn(RESULTITY_MODEL_DIR=str(tmp_path / "absent"))
    frame = rt.receive()
    assert frame["t"] == "fatal" and "does not exist" in frame["message"]
    assert rt.wait() == 2


def test_unknown_engine_is_fatal_at_start(spawn: Any) -> None:
    rt = spawn(RESULTITY_ENGINE="nope")
    frame = rt.receive()
    assert frame["t"] == "fatal" and "unknown engine" in frame["message"]
    assert rt.wait() == 2


def test_bad_engine_args_are_fatal(spawn: Any) -> None:
    rt = spawn(RESULTITY_ENGINE_ARGS="[1]")
    frame = rt.receive()
    assert frame["t"] == "fatal" and "JSON object" in frame["message"]
    assert rt.wait() == 2


def test_stdout_writes_go_to_the_log(spawn: Any, tmp_path: Path) -> None:
    """A library printing to stdout (or writing to fd 1) must not reach the frame stream."""
    sitecustomize = tmp_path / "site"
    sitecustomize.mkdir()
    (sitecustomize / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "def noise():\n"
        "    print('stray print')\n"
        "    sys.stdout.flush()\n"
        "    os.write(1, b'stray fd write')\n"
        "import containers.runtime.channel as c\n"
        "orig = c.FrameChannel.claim_stdio.__func__\n"
        "def claim(cls, **kw):\n"
        "    ch = orig(cls, **kw)\n"
        "    noise()\n"
        "    return ch\n"
        "c.FrameChannel.claim_stdio = classmethod(claim)\n"
    )
    rt = spawn(PYTHONPATH=f"{sitecustomize}:{REPO}")
    rt.ready()
    assert rt.run(req())[0]["t"] == "done"
    rt.send(frames.shutdown())
    assert rt.wait() == 0
    assert "stray print" in rt.stderr()


def test_end_of_input_finishes_what_was_submitted(spawn: Any) -> None:
    rt = spawn(**slow(2))
    rt.ready()
    rt.send(frames.submit(1, req("last words", max_tokens=20)))  # type: ignore[arg-type]
    assert rt.proc.stdin is not None
    rt.proc.stdin.close()
    assert rt.outcome(1)["t"] == "done"
    assert rt.wait() == 0


def test_shutdown_drops_running_requests(spawn: Any) -> None:
    rt = spawn(**slow(5))
    rt.ready()
    rt.send(frames.submit(1, req("long", max_tokens=100_000), stream=True))  # type: ignore[arg-type]
    rt.until("partial", 1)
    rt.send(frames.shutdown())
    assert rt.wait() == 0
