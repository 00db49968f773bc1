"""Prometheus metrics: the node's figures, exposed through `prometheus_client` on a local
port by a threaded HTTP server with a per-request deadline and a connection cap."""

import asyncio
import bisect
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from schemas.node import Gpu
from worker.core.resource import AsyncResource

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
)
"""Time to first token: vLLM's own buckets up to 10 s."""
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
"""Time per output token after the first."""
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Queue wait: a job may wait minutes for a node."""
SWITCH_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8


class Histogram:
    """Observed on the event loop, read by the metrics server's thread."""

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        counts = list(self.counts)
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.buckets, counts, strict=False):
            running += n
            buckets.append((str(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        return buckets

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(
            name, documentation, buckets=self.cumulative(), sum_value=self.total
        )


class ModelFigures:
    """What the node measured of one model's requests (label `model`)."""

    __slots__ = (
        "time_to_first_token",
        "time_per_output_token",
        "queue_wait",
        "prompt_tokens",
        "generation_tokens",
        "switches",
        "switch_downtime",
    )

    def __init__(self) -> None:
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.time_per_output_token = Histogram(TPOT_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.switches = 0
        self.switch_downtime = Histogram(SWITCH_BUCKETS)


@dataclass(frozen=True, slots=True)
class EngineGauges:
    """The runtime's engine as its last `pong` reported it, for the model it runs."""

    model: str
    running: int
    waiting: int
    kv_cache_usage: float | None
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None


class Metrics:
    """The node's counters, gauges and histograms (names prefixed `resultity_`, units in
    the names, counters exposed with `_total`).

    Updated on the event loop as plain attributes; `registry` reads them at each scrape.
    `collect`, when set, is called first to copy in figures kept elsewhere (the engine's
    gauges, the GPUs).
    """

    def __init__(self) -> None:
        self.jobs_received = 0
        self.jobs_succeeded = 0
        self.jobs_failed: dict[str, int] = defaultdict(int)
        self.runtime_restarts = 0
        self.in_flight = 0
        self.engine_seconds = Histogram(LATENCY_BUCKETS)
        self.job_latency_seconds = Histogram(LATENCY_BUCKETS)
        self.models: dict[str, ModelFigures] = {}
        self.engine: EngineGauges | None = None
        self.gpus: list[Gpu] = []
        self.collect: Callable[[], None] | None = None
        """Called before each render, to copy in figures kept elsewhere."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Families(self))

    def model(self, model_id: str) -> ModelFigures:
        figures = self.models.get(model_id)
        if figures is None:
            figures = self.models[model_id] = ModelFigures()
        return figures

    def observe_completion(
        self,
        model_id: str,
        *,
        prompt_tokens: int,
        generated_tokens: int,
        first_token_s: float,
        engine_s: float,
    ) -> None:
        """One request answered: its time to first token (the engine's), the time per
        output token after the first (the rest of its time on the engine, shared out),
        and its tokens."""
        figures = self.model(model_id)
        figures.prompt_tokens += prompt_tokens
        figures.generation_tokens += generated_tokens
        figures.time_to_first_token.observe(first_token_s)
        if generated_tokens > 1:
            per_token = max(0.0, engine_s - first_token_s) / (generated_tokens - 1)
            figures.time_per_output_token.observe(per_token)

    def observe_queue_wait(self, model_id: str, seconds: float) -> None:
        """From the job's publication (its stream timestamp) to its submission to the
        runtime; includes earlier attempts of a redelivered job."""
        self.model(model_id).queue_wait.observe(max(0.0, seconds))

    def model_switched(self, model_id: str, downtime_s: float) -> None:
        """The runtime now serves `model_id` after another model (or none): a switch, and
        how long no model served (last result of the old model, or out of service, to the
        new runtime's readiness)."""
        figures = self.model(model_id)
        figures.switches += 1
        figures.switch_downtime.observe(max(0.0, downtime_s))

    def families(self) -> Iterator[Metric]:
        if self.collect is not None:
            self.collect()
        yield CounterMetricFamily(
            "resultity_jobs_received", "jobs taken from the stream", value=self.jobs_received
        )
        yield CounterMetricFamily(
            "resultity_jobs_succeeded", "jobs answered with a result", value=self.jobs_succeeded
        )
        failed = CounterMetricFamily(
            "resultity_jobs_failed", "jobs answered with an error, by code", labels=["code"]
        )
        for code, n in sorted(dict(self.jobs_failed).items()):
            failed.add_metric([code], n)
        yield failed
        yield CounterMetricFamily(
            "resultity_runtime_restarts", "runtime restarts", value=self.runtime_restarts
        )
        yield GaugeMetricFamily(
            "resultity_jobs_in_flight", "jobs fetched and not yet acked", value=self.in_flight
        )
        yield self.engine_seconds.family("resultity_engine_seconds", "engine time per job")
        yield self.job_latency_seconds.family(
            "resultity_job_latency_seconds", "time from receipt to result"
        )
        yield from self._model_families()
        yield from self._engine_families()
        yield from self._gpu_families()

    def _model_families(self) -> Iterator[Metric]:
        models = sorted(dict(self.models).items())
        histograms = {
            "time_to_first_token": ("resultity_time_to_first_token_seconds", "time to first token"),
            "time_per_output_token": (
                "resultity_time_per_output_token_seconds",
                "time per output token after the first",
            ),
            "queue_wait": (
                "resultity_queue_wait_seconds",
                "job published to request submitted to the runtime",
            ),
            "switch_downtime": (
                "resultity_model_switch_downtime_seconds",
                "no model served, per switch to this model",
            ),
        }
        for attribute, (name, documentation) in histograms.items():
            family = HistogramMetricFamily(name, documentation, labels=["model"])
            for model_id, figures in models:
                histogram: Histogram = getattr(figures, attribute)
                family.add_metric([model_id], histogram.cumulative(), histogram.total)
            yield family
        counters = {
            "prompt_tokens": ("resultity_prompt_tokens", "prompt tokens processed"),
            "generation_tokens": ("resultity_generation_tokens", "tokens generated"),
            "switches": ("resultity_model_switches", "switches of the runtime to this model"),
        }
        for attribute, (name, documentation) in counters.items():
            counter = CounterMetricFamily(name, documentation, labels=["model"])
            for model_id, figures in models:
                counter.add_metric([model_id], getattr(figures, attribute))
            yield counter

    def _engine_families(self) -> Iterator[Metric]:
        engine = self.engine
        gauges = {
            "running": ("resultity_requests_running", "requests the engine runs"),
            "waiting": ("resultity_requests_waiting", "requests waiting in the engine"),
            "kv_cache_usage": ("resultity_kv_cache_usage_ratio", "share of the KV cache in use"),
        }
        for attribute, (name, documentation) in gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["model"])
            value = getattr(engine, attribute) if engine is not None else None
            if engine is not None and value is not None:
                gauge.add_metric([engine.model], value)
            yield gauge
        counters = {
            "prefix_cache_queries": ("resultity_prefix_cache_queries", "prompt tokens looked up"),
            "prefix_cache_hits": ("resultity_prefix_cache_hits", "prompt tokens found cached"),
        }
        for attribute, (name, documentation) in counters.items():
            counter = CounterMetricFamily(
                name, f"{documentation} in the prefix cache (this runtime)", labels=["model"]
            )
            value = getattr(engine, attribute) if engine is not None else None
            if engine is not None and value is not None:
                counter.add_metric([engine.model], value)
            yield counter

    def _gpu_families(self) -> Iterator[Metric]:
        gpus = list(self.gpus)
        labels = ["gpu", "uuid", "name"]
        gauges = {
            "memory_used_bytes": ("resultity_gpu_memory_used_bytes", "GPU memory in use"),
            "memory_total_bytes": ("resultity_gpu_memory_total_bytes", "GPU memory"),
            "utilization_ratio": ("resultity_gpu_utilization_ratio", "GPU busy share"),
            "temperature_celsius": ("resultity_gpu_temperature_celsius", "GPU temperature"),
            "power_watts": ("resultity_gpu_power_watts", "GPU power draw"),
        }
        for attribute, (name, documentation) in gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=labels)
            for gpu in gpus:
                value = getattr(gpu, attribute)
                if value is not None:
                    gauge.add_metric([str(gpu.index), gpu.uuid, gpu.name], value)
            yield gauge

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _Families(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.families()


class _Handler(WSGIRequestHandler):
    """wsgiref's request parsing (line and header limits answered with 414/431)."""

    server_version = "resultity-node"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics_request %s", format % args)


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most `max_connections` at once (more are closed
    unanswered); each connection is cut `request_timeout_s` after it was accepted,
    whatever it is doing (a client dripping bytes or not reading the answer)."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        request_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.address_family = family
        self.request_timeout_s = request_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("metrics_connection_refused peer=%s reason=too_many", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.request_timeout_s)
        timer = threading.Timer(self.request_timeout_s, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics_request_failed peer=%s", client_address, exc_info=True)


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _family(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class MetricsServer(AsyncResource):
    """`GET /metrics` over HTTP/1.0 on a local port, served from a thread."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._host = host
        self._port = port
        self._request_timeout_s = request_timeout_s
        self._max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    async def _open(self, stack: AsyncExitStack) -> None:
        exposition = make_wsgi_app(self._metrics.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found\n"]
            result: Iterable[bytes] = exposition(environ, start_response)
            return result

        server = await asyncio.to_thread(
            _Server,
            (self._host, self._port),
            _family(self._host, self._port),
            self._request_timeout_s,
            self._max_connections,
        )
        server.set_app(app)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.2,), name="metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics_listening host=%s port=%d", self._host, self.port)

    async def _close(self) -> None:
        """Stop accepting (`shutdown` waits for the serving loop to end), then close the
        socket; connections in flight end at their own deadline (daemon threads)."""
        server = self._server
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
