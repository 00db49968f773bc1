# The node agent (`resultity-node run`) for the compose stack and the testcontainers tests.
# Built by `resultity-node stack prepare` (worker/devtools/stack.py), which assembles the context:
#   wheels/  the project's runtime dependencies and setuptools, downloaded on the host
#   src/     pyproject.toml and the packages worker/, schemas/, containers/
# Installed without an index, so the build needs no network.
# BASE: any Debian-like image with python3 (3.11) and its venv module.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# Dependencies first, the project second: an edit to the sources reuses the dependency layer.
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --no-deps --no-cache-dir \
        --disable-pip-version-check --quiet /tmp/wheels/*.whl
COPY src/ /tmp/src/
RUN /opt/venv/bin/python -m pip install --no-index --no-deps --no-build-isolation \
        --no-cache-dir --disable-pip-version-check --quiet /tmp/src \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESULTITY_KEY_FILE=/run/secrets/node_key \
    RESULTITY_STATE_DIR=/var/lib/resultity/state \
    RESULTITY_CACHE_DIR=/var/lib/resultity/cache
# Root, on purpose and only for this: the agent drives the host's Docker engine through
# /var/run/docker.sock (mounted by the operator) to start the hardened, networkless runtime
# container. Access to that socket is root-equivalent on the host, so treat the agent
# container as part of the host's trusted base. The runtime itself runs as 65534:65534.
USER 0:0
WORKDIR /var/lib/resultity
ENTRYPOINT ["resultity-node"]
CMD ["run"]
