# The echo runtime's dependencies: Python and msgpack only, no ML dependencies (protocol and
# chaos tests). The runtime process goes on top (containers/runtime.Dockerfile).
# Built by `resultity-node images build --engine echo`, which assembles the context:
#   wheels/  the msgpack wheel
# BASE: any Debian-like image with python3 (3.11) and its venv module.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/resultity \
    PYTHONDONTWRITEBYTECODE=1 \
    RESULTITY_ENGINE=echo \
    RESULTITY_MODEL_DIR=/model
WORKDIR /opt/resultity
