# The runtime process on top of an engine's dependencies image (containers/<engine>.Dockerfile,
# passed as the build argument DEPS). Built by `resultity-node images build`, which assembles
# the context: app/ only (schemas/frames.py and containers/runtime/), so that a change of the
# runtime code rebuilds this thin layer alone, never the engine's gigabytes.
ARG DEPS
FROM ${DEPS}
COPY app/ /opt/resultity/
RUN python3 -m compileall -q /opt/resultity
USER 65534:65534
ENTRYPOINT ["python3", "-m", "containers.runtime"]
