# Prometheus for the compose stack, with its scrape config (prometheus.yml beside this file).
# Built by `resultity-node stack prepare` (worker/devtools/stack.py), which assembles the context:
#   prometheus.yml   the scrape config          data/   an empty dir for the TSDB
# BASE: the public image a user would pull, or (where no registry answers) a Debian base made
# by mmdebstrap with Debian's `prometheus` package. Both have the binary at /bin/prometheus
# (Debian's /usr/bin, through the merged /usr).
ARG BASE=prom/prometheus:v2.42.0
FROM ${BASE}
COPY prometheus.yml /etc/prometheus/prometheus.yml
COPY --chown=65534:65534 data/ /prometheus/
USER 65534:65534
VOLUME /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.listen-address=:9090", "--storage.tsdb.retention.time=7d"]
