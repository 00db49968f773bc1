"""Device facts for the execution class: does a GPU node reproduce CPU-made validation vectors?

Run on a machine with an NVIDIA GPU and PyTorch + transformers (no vLLM needed):
`python bench/gpu_check.py MODEL_DIR OUT.json`, with MODEL_DIR the demo model made by
`worker.devtools.demomodel.make_tiny_llama`. It reports the device name the vLLM runtime
puts in `runtime.device` (torch.cuda.get_device_name), and the greedy token ids of the same
prompts on the CPU (fp32) and on the GPU (fp32, bf16), so the README can say which execution
classes share validation vectors. A plain script: the device machine has no project install.
"""

import json
import sys
import time
from typing import Any

PROMPTS = (
    "The node signs",
    "Resultity nodes sign every result",
    "once upon a time",
    "0123456789",
    "Models are verified by their SHA-256",
    "A",
    "The quick brown fox jumps over the lazy dog.",
    "Every result is signed with the node's key and published back to the network.",
)
MAX_NEW_TOKENS = 32


def greedy(model: Any, tokenizer: Any, device: str, dtype: Any) -> list[list[int]]:
    import torch

    m = model.to(device=device, dtype=dtype)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        with torch.no_grad():
            gen = m.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        out.append([int(t) for t in gen[0, ids.shape[1] :]])
    return out


def main() -> None:
    import torch
    import transformers

    model_dir, out_path = sys.argv[1], sys.argv[2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    runs = {"cpu_fp32": greedy(model, tokenizer, "cpu", torch.float32)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["device_name"] = torch.cuda.get_device_name(0)
        report["capability"] = list(torch.cuda.get_device_capability(0))
        report["memory_gib"] = round(props.total_memory / 2**30, 1)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        start = time.perf_counter()
        runs["cuda_fp32"] = greedy(model, tokenizer, "cuda", torch.float32)
        runs["cuda_bf16"] = greedy(model, tokenizer, "cuda", torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = True
        runs["cuda_fp32_tf32"] = greedy(model, tokenizer, "cuda", torch.float32)
        report["gpu_seconds"] = round(time.perf_counter() - start, 2)
    report["runs"] = runs
    base = runs["cpu_fp32"]
    report["equal_to_cpu_fp32"] = {
        name: [a == b for a, b in zip(ids, base, strict=True)] for name, ids in runs.items()
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
