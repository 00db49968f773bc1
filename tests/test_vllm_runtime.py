"""Real vLLM in the CPU runtime image on the tiny demo model, plus the demo model's
reproducibility. The image build is slow the first time (see worker/images.py)."""

import hashlib
import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas import frames
from schemas.frames import Frame
from tests.support.framepipe import FramePipe
from worker.devtools import demomodel, images

HAS_MODEL_DEPS = all(
    importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "tokenizers")
)


def test_echo_demo_model_archive_is_reproducible(tmp_path: Path) -> None:
    one = demomodel.make_demo_model(tmp_path / "one", "echo")
    two = demomodel.make_demo_model(tmp_path / "two", "echo")
    assert one.sha256 == two.sha256
    assert one.archive.read_bytes() == two.archive.read_bytes()


def test_archive_ignores_times_and_owners(tmp_path: Path) -> None:
    model = demomodel.make_echo_model(tmp_path / "model")
    first = demomodel.write_archive(model, tmp_path / "a.tar")
    os.utime(model / "weights.bin", (12345, 12345))
    assert demomodel.write_archive(model, tmp_path / "b.tar") == first
    (model / "weights.bin").write_bytes(b"changed")
    assert demomodel.write_archive(model, tmp_path / "c.tar") != first


@pytest.mark.skipif(not HAS_MODEL_DEPS, reason="needs the models extra (torch, transformers)")
def test_tiny_llama_is_byte_identical_across_runs(tmp_path: Path) -> None:
    one = demomodel.make_demo_model(tmp_path / "one", "llama")
    two = demomodel.make_demo_model(tmp_path / "two", "llama")
    assert one.sha256 == two.sha256
    assert (one.directory / "model.safetensors").stat().st_size > 1_000_000


class ContainerRuntime(FramePipe):
    """`docker run -i` of a runtime image, hardened as the supervisor runs it."""

    def __init__(self, image_id: str, model_dir: Path, model_sha256: str) -> None:
        command = ["docker", "run", "--rm", "-i", "--network", "none", "--read-only"]
        command += ["--tmpfs", "/tmp:exec", "--shm-size", "512m", "--cap-drop", "ALL"]
        command += ["--security-opt", "no-new-privileges", "-v", f"{model_dir}:/model:ro"]
        command += ["-e", f"RESULTITY_MODEL_SHA256={model_sha256}", image_id]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        super().__init__(proc, max_frame_bytes=frames.MAX_FRAME_BYTES)

    def run(self, batch_id: int, items: list[Frame]) -> list[Frame]:
        self.send(frames.batch(batch_id, items))
        answer = self.receive(timeout=300)
        assert answer["t"] == "result" and answer["id"] == batch_id, answer
        outcomes: list[Frame] = answer["items"]
        return outcomes

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(frames.shutdown())
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _tiny_llama(tmp_path: Path, image_id: str) -> demomodel.DemoModel:
    if HAS_MODEL_DEPS:
        return demomodel.make_demo_model(tmp_path, "llama")
    # Without the models extra on the host, the image (which has torch) makes the model.
    script = (
        "import sys; sys.path.insert(0, '/gen');"
        "from pathlib import Path; from demomodel import make_demo_model;"
        "print(make_demo_model(Path('/out'), 'llama').sha256)"
    )
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}",
         "-e", "HOME=/tmp", "-v", f"{Path(demomodel.__file__)}:/gen/demomodel.py:ro",
         "-v", f"{tmp_path}:/out", "--entrypoint", "python3", image_id, "-c", script],
        check=True, timeout=300,
    )  # fmt: skip
    archive = tmp_path / "tiny-llama.tar"

    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    return demomodel.DemoModel(tmp_path / "tiny-llama", archive, sha, archive.stat().st_size)


def _job(job_id: str, prompt: str, **params: Any) -> Frame:
    return {"job_id": job_id, "prompt": prompt, "params": {"max_tokens": 24, **params}}


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_cpu_answers_and_batching_keeps_token_ids(docker_client: Any, tmp_path: Path) -> None:
    image_id = images.ensure_image("vllm-cpu", client=docker_client)
    model = _tiny_llama(tmp_path, image_id)
    runtime = ContainerRuntime(image_id, model.directory, model.sha256)
    try:
        ready = runtime.receive(timeout=300)
        assert ready["t"] == "ready", ready
        assert ready["engine"] == "vllm" and ready["device"] == "cpu"
        assert ready["engine_version"].startswith("0.32")
        assert ready["model_sha256"] == model.sha256

        greedy = _job("greedy", "The quick brown fox")
        sampled = _job("sampled", "Models are verified", temperature=0.8, top_p=0.9, seed=7)
        tokens = {
            "job_id": "tokens",
            "prompt_token_ids": [0, 40, 41, 42, 43],
            "params": {"max_tokens": 8, "seed": 3},
        }
        alone = runtime.run(1, [greedy]) + runtime.run(2, [sampled]) + runtime.run(3, [tokens])
        for outcome in alone:
            assert "error" not in outcome, outcome
            assert outcome["token_ids"] and outcome["finish_reason"] in ("stop", "length")
        assert len(alone[0]["token_ids"]) <= 24 and len(alone[2]["token_ids"]) <= 8
        assert alone[2]["prompt_tokens"] == 5

        crowd = [
            _job(f"other-{i}", f"once upon a time number {i}", seed=i, temperature=0.5 * (i % 3))
            for i in range(29)
        ]
        crowd[5:5] = [greedy]
        crowd[17:17] = [sampled]
        crowd[30:30] = [tokens]
        assert len(crowd) == 32
        batched = runtime.run(4, crowd)
        assert [o["job_id"] for o in batched] == [c["job_id"] for c in crowd]
        assert all("error" not in o for o in batched)
        by_id = {o["job_id"]: o for o in batched}
        for outcome in alone:
            assert by_id[outcome["job_id"]]["token_ids"] == outcome["token_ids"]
            assert by_id[outcome["job_id"]]["text"] == outcome["text"]

        too_long = _job("too-long", "fox " * 400)
        mixed = runtime.run(5, [too_long, greedy])
        assert "error" in mixed[0] and mixed[1]["token_ids"] == alone[0]["token_ids"]
    finally:
        runtime.close()
