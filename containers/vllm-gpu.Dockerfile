# The production GPU runtime: the official vLLM image plus the Resultity runtime process.
# Not built in this workplace (no registry); build where the base can be pulled:
#   resultity-node images build --engine vllm-gpu
# The context holds wheels/ (the msgpack wheel) and app/ (schemas/frames.py and
# containers/runtime/). Run with GPUs passed through, no network, the model at /model.
ARG BASE=vllm/vllm-openai:v0.32.0
FROM ${BASE}
COPY wheels/ /tmp/wheels/
RUN python3 -m pip install --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
COPY app/ /opt/resultity/
RUN python3 -m compileall -q /opt/resultity && python3 -c "import msgpack, vllm"
ENV PYTHONPATH=/opt/resultity \
    PYTHONDONTWRITEBYTECODE=1 \
    RESULTITY_ENGINE=vllm \
    RESULTITY_MODEL_DIR=/model \
    TMPDIR=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
WORKDIR /opt/resultity
USER 65534:65534
ENTRYPOINT ["python3", "-m", "containers.runtime"]
