"""Prometheus metrics: a small registry and a text-format HTTP endpoint on a local port."""

import asyncio
import bisect
import logging
from collections import defaultdict
from collections.abc import Callable

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


class Histogram:
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

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    """The node's counters, gauges and histograms (names prefixed `resultity_`)."""

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

    def render(self) -> str:
        if self.collect is not None:
            self.collect()
        lines = [
            "# TYPE resultity_jobs_received_total counter",
            f"resultity_jobs_received_total {self.jobs_received}",
            "# TYPE resultity_jobs_succeeded_total counter",
            f"resultity_jobs_succeeded_total {self.jobs_succeeded}",
            "# TYPE resultity_jobs_failed_total counter",
        ]
        lines += [
            f'resultity_jobs_failed_total{{code="{code}"}} {n}'
            for code, n in sorted(self.jobs_failed.items())
        ]
        lines += [
            "# TYPE resultity_runtime_restarts_total counter",
            f"resultity_runtime_restarts_total {self.runtime_restarts}",
            "# TYPE resultity_jobs_in_flight gauge",
            f"resultity_jobs_in_flight {self.in_flight}",
            "# TYPE resultity_engine_seconds histogram",
            *self.engine_seconds.render("resultity_engine_seconds"),
            "# TYPE resultity_job_latency_seconds histogram",
            *self.job_latency_seconds.render("resultity_job_latency_seconds"),
        ]
        return "\n".join(lines) + "\n"


class MetricsServer:
    """`GET /metrics` over plain HTTP/1.0 on a local port."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> "MetricsServer":
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("metrics_listening host=%s port=%d", self._host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            if request.split(b" ")[1:2] == [b"/metrics"]:
                body = self._metrics.render().encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()
