"""Prometheus metrics: the node's figures, exposed through `prometheus_client` on a local
port by a threaded HTTP server with a per-request deadline and a connection cap."""

import asyncio
import bisect
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
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

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts = list(self.counts)
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.buckets, counts, strict=False):
            running += n
            buckets.append((str(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class Metrics:
    """The node's counters, gauges and histograms (names prefixed `resultity_`).

    Updated on the event loop as plain attributes; `registry` reads them at each scrape.
    """

    def __init__(self) -> None:
        self.jobs_received = 0
        self.jobs_succeeded = 0
        self.jobs_failed: dict[str, int] = defaultdict(int)
        self.runtime_restarts = 0
        self.in_flight = 0
        self.engine_seconds = Histogram(LATENCY_BUCKETS)
        self.job_latency_seconds = Histogram(LATENCY_BUCKETS)
        self.collect: Callable[[], None] | None = None
        """Called before each render, to copy in figures kept elsewhere."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Families(self))

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


class MetricsServer:
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

    async def __aenter__(self) -> "MetricsServer":
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
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
