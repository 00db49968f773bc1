# The echo runtime: Python and msgpack only, no ML dependencies (protocol and chaos tests).
# Built by `resultity-node images build --engine echo`, which assembles the context:
#   wheels/  the msgpack wheel    app/  schemas/frames.py and containers/runtime/
# BASE: any Debian-like image with python3 (3.11) and its venv module.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl
COPY app/ /opt/resultity/
RUN /opt/venv/bin/python -m compileall -q /opt/resultity

FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/resultity /opt/resultity
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/resultity \
    PYTHONDONTWRITEBYTECODE=1 \
    RESULTITY_ENGINE=echo \
    RESULTITY_MODEL_DIR=/model
WORKDIR /opt/resultity
USER 65534:65534
ENTRYPOINT ["python3", "-m", "containers.runtime"]
