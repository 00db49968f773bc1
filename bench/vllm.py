"""Batching efficiency: vLLM called directly in one process vs the same prompts through the
supervisor and a hardened container. Both run the vllm-cpu image on the tiny demo model."""

import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import record
from worker.core.settings import Settings
from worker.runtime.api import Completion, LaunchSpec, WorkItem

PROMPTS = [f"Prompt number {i} asks the node" for i in range(64)]
MAX_TOKENS = 64
ROUNDS = 8
ALTERNATIONS = 3
WARMUP = 3  # full batches before timing, as bench/vllm_direct.py does


def _direct(image: str, model_dir: Path) -> list[tuple[int, float]]:
    script = Path(__file__).with_name("vllm_direct.py")
    args = json.dumps([PROMPTS, MAX_TOKENS, ROUNDS])
    out = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--shm-size",
            "512m",
            "--user",
            "65534:65534",
            "-v",
            f"{model_dir}:/model:ro",
            "-v",
            f"{script}:/bench/vllm_direct.py:ro",
            "--entrypoint",
            "python3",
            image,
            "/bench/vllm_direct.py",
            args,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return [(int(t), float(s)) for t, s in json.loads(line.removeprefix("RESULT "))]


async def _supervised(settings: Settings, launch: LaunchSpec) -> list[tuple[int, float]]:
    from worker.runtime.supervisor import Supervisor, create_backend

    items = [
        WorkItem(f"p{i}", {"prompt": p, "params": {"max_tokens": MAX_TOKENS, "seed": 0}})
        for i, p in enumerate(PROMPTS)
    ]
    runs = []
    async with Supervisor(settings, create_backend(settings, node_id="bench-vllm"), launch) as sup:
        for _ in range(WARMUP):  # vLLM keeps getting faster over its first full batches
            await sup.run(items)
        for _ in range(ROUNDS):
            started = time.perf_counter()
            outs = await sup.run(items)
            seconds = time.perf_counter() - started
            runs.append((sum(len(o.token_ids) for o in outs if isinstance(o, Completion)), seconds))
    return runs


async def batching_efficiency() -> dict[str, Any]:
    from worker.devtools.demomodel import make_demo_model
    from worker.devtools.images import ensure_image_async

    image = await ensure_image_async("vllm-cpu")
    with tempfile.TemporaryDirectory(prefix="rst-bench-vllm-") as tmp:
        model = await asyncio.to_thread(make_demo_model, Path(tmp), "llama")
        settings = Settings(
            key_file=Path(tmp) / "k",
            cache_dir=Path(tmp) / "c",
            state_dir=Path(tmp) / "s",
            runtime_backend="docker",
            runtime_memory="6g",
            request_timeout_s=600,
        )
        launch = LaunchSpec("vllm", image, model.directory, model.sha256, {})
        # alternated, several starts of each, median round: the machine is shared and
        # noisy (single rounds swing by +-30% with identical settings)
        runs: dict[str, list[float]] = {"direct": [], "supervised": []}
        for _ in range(ALTERNATIONS):
            direct = await asyncio.to_thread(_direct, image, model.directory)
            runs["direct"] += [t / s for t, s in direct]
            runs["supervised"] += [t / s for t, s in await _supervised(settings, launch)]
    direct_tps = statistics.median(runs["direct"])
    sup_tps = statistics.median(runs["supervised"])
    figures = {
        "prompts": len(PROMPTS),
        "max_tokens": MAX_TOKENS,
        "direct_tokens_per_s": round(direct_tps),
        "supervised_tokens_per_s": round(sup_tps),
        "rounds_each": len(runs["direct"]),
    }
    return record(
        "vLLM batch: supervisor+container vs direct",
        figures,
        round(sup_tps / direct_tps, 3),
        ">= 0.95",
    )


if __name__ == "__main__":
    print(json.dumps(asyncio.run(batching_efficiency()), indent=2))
