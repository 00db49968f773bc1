"""The runtime process (`python -m containers.runtime`) with the echo engine, as a subprocess:
frames in on stdin, frames out on stdout, every injected fault."""

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
from tests.support.framepipe import FramePipe

REPO = Path(__file__).resolve().parent.parent


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

    def ready(self) -> Frame:
        frame = self.receive()
        assert frame["t"] == "ready", frame
        return frame

    def run(self, items: list[Frame], batch_id: int = 1) -> list[Frame]:
        self.send(frames.batch(batch_id, items))
        frame = self.receive()
        assert frame["t"] == "result" and frame["id"] == batch_id, frame
        outcomes: list[Frame] = frame["items"]
        return outcomes

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


def item(job_id: str, prompt: str = "hello", **params: Any) -> Frame:
    return {"job_id": job_id, "prompt": prompt, "params": params}


def test_ready_reports_facts(spawn: Any) -> None:
    rt = spawn(RESULTITY_MODEL_SHA256="ab" * 32, RESULTITY_DEVICE="test-device")
    ready = rt.ready()
    assert ready == frames.ready(
        engine="echo", engine_version="echo-1", model_sha256="ab" * 32, device="test-device"
    )


def test_batch_answers_each_job_in_order(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    items = [item(f"j{i}", f"prompt {i}", max_tokens=5 + i, seed=i) for i in range(10)]
    items.append({"job_id": "tok", "prompt_token_ids": [1, 2, 3], "params": {}})
    outcomes = rt.run(items)
    assert [o["job_id"] for o in outcomes] == [i["job_id"] for i in items]
    for i, outcome in enumerate(outcomes[:10]):
        assert len(outcome["token_ids"]) == 5 + i
        assert all(0 <= t < 50000 for t in outcome["token_ids"])
        assert outcome["finish_reason"] == "length"
        assert outcome["prompt_tokens"] == len(f"prompt {i}".encode())
        assert outcome["text"]
    assert len(outcomes[10]["token_ids"]) == 16
    assert outcomes[10]["prompt_tokens"] == 3


def test_output_is_deterministic_alone_and_in_a_batch(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    alone = rt.run([item("x", "same", seed=7)], batch_id=1)[0]
    crowd = [item(f"o{i}", f"other {i}", seed=i) for i in range(31)]
    crowd.insert(13, item("x", "same", seed=7))
    batched = rt.run(crowd, batch_id=2)[13]
    assert alone == batched
    reseeded = rt.run([item("x", "same", seed=8)], batch_id=3)[0]
    assert reseeded["token_ids"] != alone["token_ids"]


def test_output_depends_on_the_model_bytes(spawn: Any, model_dir: Path) -> None:
    first = spawn()
    hash_before = first.ready()["model_sha256"]
    before = first.run([item("x")])[0]
    (model_dir / "weights.bin").write_bytes(b"other weights")
    second = spawn()
    assert second.ready()["model_sha256"] != hash_before
    assert second.run([item("x")])[0]["token_ids"] != before["token_ids"]


def test_stop_string_ends_the_output(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    full = rt.run([item("a", max_tokens=8)])[0]
    third_word = full["text"].split()[2]
    stopped = rt.run([item("a", max_tokens=8, stop=[third_word])], batch_id=2)[0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["token_ids"] == full["token_ids"][: len(stopped["token_ids"])]
    assert len(stopped["token_ids"]) <= 3


def test_invalid_item_fails_alone(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    outcomes = rt.run(
        [
            item("good"),
            {"job_id": "both", "prompt": "a", "prompt_token_ids": [1]},
            item("bad-temp", temperature=9),
            item("bad-max", max_tokens=0),
        ]
    )
    assert "token_ids" in outcomes[0]
    assert [o.get("error", "")[:11] for o in outcomes[1:]] == ["bad request"] * 3


def test_ping_pong_and_shutdown(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.ping(42))
    assert rt.receive() == frames.pong(42)
    rt.send(frames.shutdown())
    assert rt.wait() == 0
    with pytest.raises(EOFError):
        rt.receive()


def test_throughput_thousands_of_items_per_second(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    items = [item(f"j{i}", f"prompt number {i}", seed=i) for i in range(5000)]
    started = time.perf_counter()
    outcomes = rt.run(items)
    elapsed = time.perf_counter() - started
    assert len(outcomes) == 5000
    assert elapsed < 2.5, f"5000 echo items took {elapsed:.2f}s"


def test_fault_error_fails_only_that_job(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    outcomes = rt.run([item("a"), item("poison", "!fault:error"), item("c")])
    assert "token_ids" in outcomes[0] and "token_ids" in outcomes[2]
    assert outcomes[1] == frames.failed("poison", "injected error (echo fault)")


def test_fault_crash_exits_mid_batch(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.batch(1, [item("a"), item("poison", "!fault:crash"), item("c")]))
    with pytest.raises(EOFError):
        rt.receive()
    assert rt.wait() == 3


def test_fault_hang_never_answers(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.batch(1, [item("poison", "!fault:hang")]))
    rt.send(frames.ping(1))
    with pytest.raises(TimeoutError):
        rt.receive(timeout=1.0)
    assert rt.proc.poll() is None


def test_fault_garbage_breaks_the_stream(spawn: Any) -> None:
    rt = spawn()
    rt.ready()
    rt.send(frames.batch(1, [item("poison", "!fault:garbage")]))
    with pytest.raises(FrameError):
        rt.receive()


def test_fault_oversize_frame(spawn: Any) -> None:
    rt = spawn(RESULTITY_MAX_FRAME_BYTES="65536")
    rt.ready()
    rt.send(frames.batch(1, [item("poison", "!fault:oversize")]))
    with pytest.raises(FrameError, match="larger than 65536"):
        for _ in range(10):
            rt.receive()


@pytest.mark.parametrize(
    "env",
    [{"RESULTITY_ECHO_FAULT": "noready"}, {"RESULTITY_ENGINE_ARGS": '{"fault": "noready"}'}],
)
def test_fault_noready(spawn: Any, env: dict[str, str]) -> None:
    rt = spawn(**env)
    with pytest.raises(TimeoutError):
        rt.receive(timeout=1.0)
    assert rt.proc.poll() is None


def test_slow_ms_delays_each_batch(spawn: Any) -> None:
    rt = spawn(RESULTITY_ENGINE_ARGS='{"slow_ms": 300}')
    rt.ready()
    started = time.perf_counter()
    rt.run([item("a")])
    assert time.perf_counter() - started >= 0.3


@pytest.mark.parametrize(
    "raw",
    [
        b"hello world\n",
        frames.pack({"t": "bogus"}),
        msgpack.packb([1, 2, 3]),
        frames.pack({"t": "batch", "id": 1, "items": [{"prompt": "no job id"}]}),
        frames.pack({"t": "batch", "id": "one", "items": []}),
    ],
    ids=["garbage", "unknown-type", "not-a-map", "no-job-id", "bad-batch-id"],
)
def test_malformed_input_is_fatal(spawn: Any, raw: bytes) -> None:
    rt = spawn()
    rt.ready()
    rt.send_raw(raw)
    frame = rt.receive()
    assert frame["t"] == "fatal" and "bad input frame" in frame["message"]
    assert rt.wait() == 1


def test_oversized_input_is_fatal(spawn: Any) -> None:
    rt = spawn(RESULTITY_MAX_FRAME_BYTES="4096")
    rt.ready()
    rt.send(frames.batch(1, [item("big", "x" * 10000)]))
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
    assert rt.run([item("a")])[0]["job_id"] == "a"
    rt.send(frames.shutdown())
    assert rt.wait() == 0
    assert "stray print" in rt.stderr()
