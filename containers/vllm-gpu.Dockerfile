# The production GPU runtime's dependencies: the official vLLM image plus msgpack. The
# runtime process goes on top (containers/runtime.Dockerfile).
# Not built in this workplace (no registry); build where the base can be pulled:
#   resultity-node images build --engine vllm-gpu
# The context holds wheels/ (the msgpack wheel). Run with GPUs passed through, no network,
# the model at /model.
ARG BASE=vllm/vllm-openai:v0.32.0
FROM ${BASE}
COPY wheels/ /tmp/wheels/
RUN python3 -m pip install --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && python3 -c "import msgpack, vllm"
ENV PYTHONPATH=/opt/resultity \
    PYTHONDONTWRITEBYTECODE=1 \
    RESULTITY_ENGINE=vllm \
    RESULTITY_MODEL_DIR=/model \
    TMPDIR=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
WORKDIR /opt/resultity
