"""Run inside the vllm-cpu runtime image, in a container created with the runtime's own
options: vLLM called directly in one process, the baseline of the vLLM benchmark.
Prints one line: `RESULT [[tokens, seconds], ...]`, one pair per timed batch."""

import json
import sys
import time

WARMUP = 3


def main() -> None:
    from containers.runtime.engines.vllm import CPU_DEFAULTS, prepare_environment

    prepare_environment()
    import vllm  # type: ignore[import-not-found]

    prompts, max_tokens, rounds, ignore_eos = json.loads(sys.argv[1])
    llm = vllm.LLM(model="/model", seed=0, **CPU_DEFAULTS)
    # one SamplingParams per prompt, as the runtime builds them
    params = [
        vllm.SamplingParams(
            n=1, max_tokens=max_tokens, temperature=0, top_p=1.0, seed=0, ignore_eos=ignore_eos
        )
        for _ in prompts
    ]
    for _ in range(WARMUP):  # vLLM keeps getting faster over its first full batches
        llm.generate(prompts, params, use_tqdm=False)
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        runs.append((sum(len(o.outputs[0].token_ids) for o in outs), seconds))
    sys.stdout.write("RESULT " + json.dumps(runs) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
