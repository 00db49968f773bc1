"""The metrics endpoint against hostile clients (issue 11, item 11): an over-long header,
a client dripping a request forever, more connections than the cap."""

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.node import Gpu
from worker.core.metrics import EngineGauges, Metrics, MetricsServer

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


def test_model_engine_and_gpu_families_follow_prometheus_names() -> None:
    metrics = Metrics()
    metrics.observe_completion(
        "tiny", prompt_tokens=5, generated_tokens=11, first_token_s=0.05, engine_s=0.55
    )
    metrics.observe_queue_wait("tiny", 0.2)
    metrics.observe_queue_wait("tiny", -1.0)  # a server clock ahead of ours: no wait
    metrics.model_switched("other", 4.0)
    metrics.engine = EngineGauges("tiny", 3, 1, 0.5, prefix_cache_queries=90, prefix_cache_hits=30)
    metrics.gpus = [
        Gpu(
            index=0,
            uuid="GPU-1",
            name="NVIDIA H200",
            memory_total_bytes=100,
            memory_used_bytes=40,
            driver_version="550",
            temperature_celsius=60,
            utilization_ratio=0.5,
            power_watts=300.5,
        )
    ]
    text = metrics.render()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    tiny = (("model", "tiny"),)
    assert samples[("resultity_time_to_first_token_seconds_count", tiny)] == 1
    assert samples[("resultity_time_to_first_token_seconds_sum", tiny)] == 0.05
    assert samples[("resultity_time_per_output_token_seconds_sum", tiny)] == 0.05
    assert samples[("resultity_prompt_tokens_total", tiny)] == 5
    assert samples[("resultity_generation_tokens_total", tiny)] == 11
    assert samples[("resultity_queue_wait_seconds_count", tiny)] == 2
    assert samples[("resultity_queue_wait_seconds_sum", tiny)] == 0.2
    assert samples[("resultity_model_switches_total", (("model", "other"),))] == 1
    assert samples[("resultity_model_switch_downtime_seconds_sum", (("model", "other"),))] == 4
    assert samples[("resultity_requests_running", tiny)] == 3
    assert samples[("resultity_requests_waiting", tiny)] == 1
    assert samples[("resultity_kv_cache_usage_ratio", tiny)] == 0.5
    assert samples[("resultity_prefix_cache_hits_total", tiny)] == 30
    gpu = (("gpu", "0"), ("name", "NVIDIA H200"), ("uuid", "GPU-1"))
    assert samples[("resultity_gpu_memory_used_bytes", gpu)] == 40
    assert samples[("resultity_gpu_power_watts", gpu)] == 300.5
    assert ("resultity_gpu_temperature_celsius", gpu) in samples
    units = ("_seconds", "_bytes", "_ratio", "_celsius", "_watts", "_total")
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("resultity_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        elif family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        elif family.type == "gauge" and "gpu" in family.name:
            assert family.name.endswith(units), family.name
