"""vLLM: the per-batch overhead of the supervisor and its hardened container over vLLM
called directly, in the same image with the same container options.

Both sides run the vllm-cpu image on the tiny demo model, the same prompts and sampling
parameters (greedy, seed 0, `MAX_TOKENS` each), `WARMUP` untimed batches, then `ROUNDS`
timed batches per engine start. Engine starts alternate ABBA, `STARTS` per side. The
direct side (`bench/vllm_direct.py`) runs in a container made by the runtime's own
`create_kwargs` (network none, read-only root, tmpfs, caps dropped, user, memory and pids
limits), with only the entrypoint replaced. The figure is the per-batch overhead in ms:
the median supervised batch minus the median direct batch of the same pair of starts,
summarised as median and IQR over the pairs; tokens/s are reported beside it.

Fixed output length: `IGNORE_EOS` asks both sides to ignore EOS. The runtime does not
forward `ignore_eos` to vLLM yet (see `supervised_batches`), so it stays False and both
sides instead produce the same greedy tokens; every pair's token counts are compared and
a mismatch is reported (`token_counts_match`).

    python -m bench.vllm [--starts 5]
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import alternated, record, summary
from worker.core.settings import Settings
from worker.runtime.api import Completion, LaunchSpec, Runtime, WorkItem

PROMPTS = [f"Prompt number {i} asks the node" for i in range(64)]
MAX_TOKENS = 64
ROUNDS = 8
STARTS = 5
WARMUP = 3  # full batches before timing, as bench/vllm_direct.py does
IGNORE_EOS = False
TARGET = "overhead per batch within noise (report ms, IQR)"


def sampling_params() -> dict[str, Any]:
    params: dict[str, Any] = {"max_tokens": MAX_TOKENS, "seed": 0}
    if IGNORE_EOS:
        params["ignore_eos"] = True
    return params


async def supervised_batches(runtime: Runtime, rounds: int) -> list[tuple[int, float]]:
    """The supervised side through the public `Runtime` API: (tokens, seconds) per timed
    batch. The one place to adapt when the runtime protocol becomes request-level: submit
    the same 64 requests at once and time until the last completes."""
    items = [
        WorkItem(f"p{i}", {"prompt": p, "params": sampling_params()}) for i, p in enumerate(PROMPTS)
    ]
    for _ in range(WARMUP):  # vLLM keeps getting faster over its first full batches
        await runtime.run(items)
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        outs = await runtime.run(items)
        seconds = time.perf_counter() - started
        bad = [o for o in outs if not isinstance(o, Completion)]
        if bad:
            raise RuntimeError(f"supervised batch failed: {bad[0]!r}")
        runs.append((sum(len(o.token_ids) for o in outs if isinstance(o, Completion)), seconds))
    return runs


async def supervised(
    settings: Settings, launch: LaunchSpec, rounds: int
) -> list[tuple[int, float]]:
    from worker.runtime.supervisor import Supervisor, create_backend

    backend = create_backend(settings, node_id=f"bench-vllm-{os.getpid()}")
    async with Supervisor(settings, backend, launch) as sup:
        return await supervised_batches(sup, rounds)


def direct(settings: Settings, launch: LaunchSpec, rounds: int) -> list[tuple[int, float]]:
    """vLLM in a container with the runtime's options; only the entrypoint differs."""
    import docker

    from worker.runtime.container import create_kwargs

    script = Path(__file__).with_name("vllm_direct.py").read_text()
    kwargs = create_kwargs(
        launch,
        settings,
        node_id=f"bench-vllm-direct-{os.getpid()}",
        name=f"resultity-bench-vllm-direct-{time.monotonic_ns()}",
        command=[json.dumps([PROMPTS, MAX_TOKENS, rounds, IGNORE_EOS])],
        extra_env={},
    )
    kwargs["entrypoint"] = ["python3", "-c", script]
    client = docker.from_env(timeout=900)
    container = client.containers.create(**kwargs)
    try:
        container.start()
        status = container.wait(timeout=900)
        logs = container.logs(stdout=True, stderr=False).decode(errors="replace")
        line = next((x for x in logs.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = container.logs(stdout=False, stderr=True).decode(errors="replace")[-2000:]
            raise RuntimeError(f"direct vLLM run failed ({status}): {tail}")
        return [(int(t), float(s)) for t, s in json.loads(line.removeprefix("RESULT "))]
    finally:
        container.remove(force=True, v=True)
        client.close()


async def batching_overhead(starts: int = STARTS, rounds: int = ROUNDS) -> dict[str, Any]:
    from worker.devtools.demomodel import make_demo_model
    from worker.devtools.images import ensure_image_async

    image = await ensure_image_async("vllm-cpu")
    runs: dict[str, list[list[tuple[int, float]]]] = {"direct": [], "supervised": []}
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
        for _, side in alternated(("direct", "supervised"), starts):
            if side == "direct":
                runs[side].append(await asyncio.to_thread(direct, settings, launch, rounds))
            else:
                runs[side].append(await supervised(settings, launch, rounds))
    overhead_ms, match = [], True
    for d, s in zip(runs["direct"], runs["supervised"], strict=True):
        overhead_ms.append(
            (statistics.median(x for _, x in s) - statistics.median(x for _, x in d)) * 1000
        )
        match = match and {t for t, _ in d} == {t for t, _ in s}

    def per_start(side: str, f: Any) -> list[float]:
        return [statistics.median(f(t, x) for t, x in start) for start in runs[side]]

    figures: dict[str, Any] = {
        "prompts": len(PROMPTS),
        "max_tokens": MAX_TOKENS,
        "ignore_eos": IGNORE_EOS,
        "starts_each": starts,
        "rounds_per_start": rounds,
        "token_counts_match": match,
        "direct_batch_ms": summary(per_start("direct", lambda t, x: x * 1000), 1),
        "supervised_batch_ms": summary(per_start("supervised", lambda t, x: x * 1000), 1),
        "overhead_per_batch_ms": summary(overhead_ms, 1),
        "direct_tokens_per_s": summary(per_start("direct", lambda t, x: t / x), 0),
        "supervised_tokens_per_s": summary(per_start("supervised", lambda t, x: t / x), 0),
    }
    return record("vLLM batch: supervisor + container vs direct", figures, None, TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=STARTS, help="engine starts per side")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed batches per start")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(batching_overhead(args.starts, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
