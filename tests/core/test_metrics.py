"""The metrics endpoint against hostile clients (issue 11, item 11): an over-long header,
a client dripping a request forever, more connections than the cap."""

import asyncio

import pytest

from worker.core.metrics import Metrics, MetricsServer

pytestmark = pytest.mark.timeout(60)


async def scrape(port: int, request: bytes = b"GET /metrics HTTP/1.0\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def test_scrape_and_not_found() -> None:
    metrics = Metrics()
    metrics.jobs_received = 3
    metrics.jobs_failed["BAD_REQUEST"] += 1
    metrics.engine_seconds.observe(0.02)
    async with MetricsServer(metrics, "127.0.0.1", 0) as server:
        text = (await scrape(server.port)).decode()
        missing = (await scrape(server.port, b"GET /other HTTP/1.0\r\n\r\n")).decode()
    assert text.startswith("HTTP/1.0 200 OK")
    assert "resultity_jobs_received_total 3" in text
    assert 'resultity_jobs_failed_total{code="BAD_REQUEST"} 1' in text
    assert 'resultity_engine_seconds_bucket{le="0.025"} 1' in text
    assert 'resultity_engine_seconds_bucket{le="0.01"} 0' in text
    assert "resultity_engine_seconds_count 1" in text
    assert missing.startswith("HTTP/1.0 404")


async def test_over_long_header_gets_an_http_error() -> None:
    async with MetricsServer(Metrics(), "127.0.0.1", 0) as server:
        answer = await scrape(
            server.port, b"GET /metrics HTTP/1.0\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
        )
        # ... and the server still serves the next scrape
        assert (await scrape(server.port)).startswith(b"HTTP/1.0 200 OK")
    assert answer.split(b" ")[1] in (b"400", b"431")


async def test_a_dripping_client_is_cut_at_the_request_deadline() -> None:
    """Each header line comes well within any idle timeout, but the request never ends:
    the server must close the connection once the request deadline passes."""
    async with MetricsServer(Metrics(), "127.0.0.1", 0, request_timeout_s=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.0\r\n")
        closed = False
        for i in range(400):  # 20 s of drip at most
            try:
                writer.write(f"X-{i}: y\r\n".encode())
                await writer.drain()
                # The drip's pace; also the wait for the server to close on us.
                closed = await asyncio.wait_for(reader.read(1), 0.05) == b""
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
            if closed:
                break
        writer.close()
    assert closed


async def test_connections_over_the_cap_are_refused() -> None:
    async with MetricsServer(Metrics(), "127.0.0.1", 0, max_connections=2) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        # Accepted in order: the two idle connections hold both slots.
        refused = await scrape(server.port)
        for _, writer in idle:
            writer.close()
            await writer.wait_closed()
    assert b"200 OK" not in refused
