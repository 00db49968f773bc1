"""The vLLM CPU runtime image at its frame interface, for the vLLM tests
(tests/containers/test_vllm_runtime.py, tests/containers/test_vllm_chat.py): the runtime
container driven over `docker run -i`, and the tiny demo model."""

import hashlib
import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any

from schemas import frames
from schemas.frames import Frame
from tests.support.framepipe import FramePipe
from worker.devtools import demomodel

HAS_MODEL_DEPS = all(
    importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "tokenizers")
)
"""The models extra on the host: the demo model is made (and templates rendered) here."""

FRAME_TIMEOUT_S = 300


class ContainerRuntime(FramePipe):
    """`docker run -i` of a runtime image, hardened as the supervisor runs it. Request ids
    count from 1; every frame received is kept in `seen`."""

    def __init__(self, image_id: str, model_dir: Path, model_sha256: str) -> None:
        command = ["docker", "run", "--rm", "-i", "--network", "none", "--read-only"]
        command += ["--tmpfs", "/tmp:exec", "--shm-size", "512m", "--cap-drop", "ALL"]
        command += ["--security-opt", "no-new-privileges", "-v", f"{model_dir}:/model:ro"]
        command += ["-e", f"RESULTITY_MODEL_SHA256={model_sha256}", image_id]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        super().__init__(proc, max_frame_bytes=frames.MAX_FRAME_BYTES)
        self.seen: list[Frame] = []
        self.ids = iter(range(1, 1 << 30))

    def submit(self, request: dict[str, Any], **kw: Any) -> int:
        """Send `request` (a request item) in a `submit` frame; its request id."""
        request_id = next(self.ids)
        self.send(frames.submit(request_id, request, **kw))  # type: ignore[arg-type]
        return request_id

    def until(self, kind: str, request_id: int) -> Frame:
        """Frames up to the first of `kind` for `request_id`."""
        while True:
            frame = self.receive(timeout=FRAME_TIMEOUT_S)
            self.seen.append(frame)
            if frame["t"] == kind and frame.get("id") == request_id:
                return frame

    def outcome(self, request_id: int) -> Frame:
        """The `done` or `failed` frame of `request_id` (seen already, or the next one)."""
        for frame in self.seen:
            if frame["t"] in ("done", "failed") and frame.get("id") == request_id:
                return frame
        while True:
            frame = self.receive(timeout=FRAME_TIMEOUT_S)
            self.seen.append(frame)
            if frame["t"] in ("done", "failed") and frame.get("id") == request_id:
                return frame

    def alone(self, request: dict[str, Any]) -> Frame:
        return self.outcome(self.submit(request))

    def finished_order(self) -> list[int]:
        return [f["id"] for f in self.seen if f["t"] == "done"]

    def partials(self, request_id: int) -> list[Frame]:
        return [f for f in self.seen if f["t"] == "partial" and f["id"] == request_id]

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


def tiny_llama(tmp_path: Path, image_id: str) -> demomodel.DemoModel:
    """The tiny Llama demo model (with its chat template) under `tmp_path`: made on the host
    with the models extra, or else inside the vLLM image (which has torch)."""
    if HAS_MODEL_DEPS:
        return demomodel.make_demo_model(tmp_path, "llama")
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
