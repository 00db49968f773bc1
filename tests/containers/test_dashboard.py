"""The provisioned Grafana dashboard (containers/observability/) asks only for what the
node exposes: every metric name in every panel's query is in the node's exposition."""

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from schemas.node import Gpu
from worker.core.metrics import EngineGauges, Metrics

OBSERVABILITY = Path(__file__).resolve().parents[2] / "containers" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "resultity-node.json"
METRIC_NAME = re.compile(r"\bresultity_[a-z0-9_]+")


def exposed_names() -> set[str]:
    """Every sample name a serving GPU node exposes, through the calls the node makes."""
    metrics = Metrics()
    metrics.jobs_received += 1
    metrics.jobs_succeeded += 1
    metrics.jobs_failed["BAD_REQUEST"] += 1
    metrics.observe_completion(
        "m", prompt_tokens=3, generated_tokens=4, first_token_s=0.1, engine_s=0.4
    )
    metrics.observe_queue_wait("m", 0.5)
    metrics.model_switched("m", 3.0)
    metrics.engine = EngineGauges("m", 1, 0, 0.1, prefix_cache_queries=10, prefix_cache_hits=5)
    metrics.gpus = [
        Gpu(
            index=0,
            uuid="GPU-0",
            name="gpu",
            memory_total_bytes=2,
            memory_used_bytes=1,
            driver_version="1",
            temperature_celsius=50,
            utilization_ratio=0.5,
            power_watts=100,
        )
    ]
    return {
        sample.name
        for family in text_string_to_metric_families(metrics.render())
        for sample in family.samples
    }


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        found.append((f"${variable['name']}", variable["definition"]))
    return found


def test_every_metric_the_dashboard_queries_is_exposed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_names()
    asked = queries(dashboard)
    assert len(asked) > 15
    missing = [
        (title, name)
        for title, expr in asked
        for name in METRIC_NAME.findall(expr)
        if name not in exposed
    ]
    assert not missing, f"the dashboard asks for metrics the node does not expose: {missing}"


def test_the_dashboard_has_the_panels_an_operator_looks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(expr for _, expr in queries(dashboard))
    for needed in (
        "rate(resultity_generation_tokens_total",  # throughput
        "histogram_quantile(0.5, sum by (le, model) (rate(resultity_time_to_first_token",
        "histogram_quantile(0.99, sum by (le, model) (rate(resultity_time_to_first_token",
        "resultity_queue_wait_seconds_bucket",
        "sum by (code) (rate(resultity_jobs_failed_total",  # errors by code
        "resultity_kv_cache_usage_ratio",
        "resultity_gpu_memory_used_bytes",
        "resultity_gpu_utilization_ratio",
        "resultity_gpu_temperature_celsius",
        "resultity_gpu_power_watts",
    ):
        assert needed in exprs, needed
    provisioned = (OBSERVABILITY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "uid: prometheus" in provisioned
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel
