"""Run inside the vllm-cpu runtime image: vLLM's own engine loop (`LLMEngine.add_request`
for every request of a wave at once, then `step()` until all are done), the baseline of
the interactive benchmarks. Takes workloads and a number of seconds; each workload runs
one untimed wave (the engine gets faster over its first runs), then timed waves, one after
another, until they add up to that many seconds of generation (at least one). Prints one
JSON line: per workload, per timed wave, per request, its tokens and the seconds from the
wave's start to its completion."""

import json
import sys
import time


def main() -> None:
    from containers.runtime.engines.vllm import CPU_DEFAULTS, prepare_environment

    prepare_environment()
    import vllm

    workloads, seconds = json.loads(sys.argv[1])  # [[[prompt, max_tokens], ...], ...], s
    llm = vllm.LLM(model="/model", seed=0, **CPU_DEFAULTS)
    engine = llm.llm_engine
    reported = []
    for w, requests in enumerate(workloads):
        waves: list[list[tuple[int, float]]] = []
        generated, wave = 0.0, 0
        while not waves or generated < seconds:
            started = time.perf_counter()
            for i, (prompt, max_tokens) in enumerate(requests):
                params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0, seed=0)
                engine.add_request(f"{w}-{wave}-{i}", {"prompt": prompt}, params)
            finished: dict[int, tuple[int, float]] = {}
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        index = int(output.request_id.split("-")[2])
                        finished[index] = (
                            len(output.outputs[0].token_ids),
                            time.perf_counter() - started,
                        )
            if wave > 0:
                waves.append([finished[i] for i in range(len(requests))])
                generated += time.perf_counter() - started
            wave += 1
        reported.append(waves)
    sys.stdout.write("RESULT " + json.dumps(reported) + "\n")


if __name__ == "__main__":
    main()
