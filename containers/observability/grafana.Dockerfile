# Grafana for the compose stack, with the Prometheus data source and the node's dashboard
# provisioned (grafana/ beside this file). Built by `resultity-node stack prepare` when its
# base can be had (Grafana is not packaged by Debian: a registry must answer, or BASE names a
# Grafana image present locally).
ARG BASE=grafana/grafana-oss:10.4.2
FROM ${BASE}
COPY grafana/provisioning/ /etc/grafana/provisioning/
COPY grafana/dashboards/ /var/lib/grafana/dashboards/
ENV GF_AUTH_ANONYMOUS_ENABLED=true \
    GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer \
    GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH=/var/lib/grafana/dashboards/resultity-node.json \
    GF_ANALYTICS_REPORTING_ENABLED=false \
    GF_ANALYTICS_CHECK_FOR_UPDATES=false
EXPOSE 3000
