"""The OpenAI-compatible gateway, driven by the official `openai` client (and curl, from the
README), in front of a real nats-server and a real agent running the echo engine as a local
process. The vLLM features (logprobs, JSON output) are in tests/gateway/test_gateway_vllm.py."""

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import openai
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.envelope import EnvelopeType
from schemas.snapshot import Snapshot
from tests.support.gateway import (
    API_KEY,
    api_headers,
    check_provenance,
    client,
    node_settings,
    serving_node,
)
from tests.support.polling import wait_for
from worker.core.logs import quiet_console
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.gateway import snapshots as gateway_snapshots
from worker.gateway.app import running as gateway
from worker.node.snapshots import check_snapshot, config_bucket, publish_snapshot

pytestmark = pytest.mark.nats

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def authority() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, authority: NodeKey) -> Settings:
    return node_settings(nats_server, tmp_path, authority)


@pytest.fixture
async def snapshot(settings: Settings, authority: NodeKey, tmp_path: Path) -> Snapshot:
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    return await seed_network(settings, authority, plan, version=1)


async def test_openai_client_through_gateway_and_node(
    settings: Settings, snapshot: Snapshot, nc: Client
) -> None:
    model = snapshot.models[0].id
    async with serving_node(settings), gateway(settings, port=0) as url, client(url) as api:
        assert [m.id for m in (await api.models.list()).data] == [model]

        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        raw = await api.chat.completions.with_raw_response.create(
            model=model,
            messages=chat,
            max_tokens=8,
            seed=3,  # type: ignore[arg-type]
        )
        answer = raw.parse()
        text = answer.choices[0].message.content
        assert text and answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        resultity = (answer.model_extra or {})["resultity"]
        body = check_provenance(resultity, snapshot, text)
        assert raw.headers["x-resultity-job-id"] == resultity["job_id"]
        assert raw.headers["x-resultity-node-id"] == body["node_id"]
        assert raw.headers["x-resultity-input-sha256"] == body["input_sha256"]
        envelope = base64.b64decode(resultity["envelope"])
        assert raw.headers["x-resultity-envelope-sha256"] == hashlib.sha256(envelope).hexdigest()
        # The node saw the messages (the echo engine runs their plain rendering).
        assert body["usage"]["prompt_tokens"] == len("system: Be brief.\nuser: Hi")

        # The same chat streamed: the chunks add up to the signed text, usage comes last.
        pieces, last, usage = [], None, None
        stream = await api.chat.completions.create(
            model=model,
            messages=chat,  # type: ignore[arg-type]
            max_tokens=8,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for c in stream:
            if c.usage is not None:
                usage = c.usage
            for choice in c.choices:
                pieces.append(choice.delta.content or "")
                if choice.finish_reason is not None:
                    last = c
        assert last is not None and usage is not None
        streamed = "".join(pieces)
        assert streamed == text  # same job inputs, same seed: the same (deterministic) answer
        check_provenance((last.model_extra or {})["resultity"], snapshot, streamed)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

        done = await api.completions.create(model=model, prompt="hello", max_tokens=5)
        assert done.choices[0].text and len(done.choices[0].text.split()) == 5
        check_provenance((done.model_extra or {})["resultity"], snapshot, done.choices[0].text)
        tokens = await api.completions.create(model=model, prompt=[1, 2, 3], max_tokens=2)
        assert (tokens.model_extra or {})["resultity"]["job_id"] != (done.model_extra or {})[
            "resultity"
        ]["job_id"]
        texts = [
            c.choices[0].text
            async for c in await api.completions.create(
                model=model, prompt="hello", max_tokens=5, stream=True
            )
            if c.choices
        ]
        assert "".join(texts) == done.choices[0].text

        # Errors, in OpenAI's shape and status codes.
        with pytest.raises(openai.NotFoundError) as missing:
            await api.chat.completions.create(model="no-such-model", messages=chat)  # type: ignore[arg-type]
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model=model, messages=chat, n=2)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="temperature"):
            await api.chat.completions.create(model=model, messages=chat, temperature=5)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="role"):
            await api.chat.completions.create(
                model=model,
                messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}],  # type: ignore[list-item]
            )
        with pytest.raises(openai.APIStatusError) as failed:
            await api.completions.create(model=model, prompt="!fault:error", max_tokens=4)
        assert failed.value.status_code == 502
        assert failed.value.code == "RUNTIME_FAILURE"

        async with httpx.AsyncClient(base_url=url, headers=api_headers()) as http:
            bad_json = await http.post("/v1/completions", content=b"{not json")
            assert bad_json.status_code == 400 and "error" in bad_json.json()
            huge = await http.post(
                "/v1/completions", content=b"x" * (settings.gateway_max_body_bytes + 1)
            )
            assert huge.status_code == 413


async def test_deadline_is_504_and_cancels_the_job(
    nats_server: NatsServer, tmp_path: Path, authority: NodeKey, nc: Client
) -> None:
    settings = node_settings(nats_server, tmp_path, authority, gateway_timeout_s=1.0)
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot = await seed_network(settings, authority, plan, version=1)
    cancels = await nc.subscribe(settings.subject("cancel", ">"))
    # No node serves: the job waits in the queue past the request's deadline.
    async with gateway(settings, port=0) as url, client(url) as api:
        with pytest.raises(openai.APIStatusError) as late:
            await api.completions.create(model=snapshot.models[0].id, prompt="x")
        assert late.value.status_code == 504
    msg = await cancels.next_msg(timeout=10)
    assert msgpack.unpackb(msg.data) == {"job_id": msg.subject.rsplit(".", 1)[1]}


async def test_client_gone_mid_stream_cancels_its_job_and_frees_its_slot(
    nats_server: NatsServer, tmp_path: Path, authority: NodeKey, nc: Client
) -> None:
    settings = node_settings(nats_server, tmp_path, authority, gateway_max_concurrent=1)
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot = await seed_network(settings, authority, plan, version=1)
    model = snapshot.models[0].id
    cancels = await nc.subscribe(settings.subject("cancel", ">"))
    body = {"model": model, "prompt": "x", "stream": True}
    async with (
        gateway(settings, port=0) as url,
        httpx.AsyncClient(base_url=url, headers=api_headers()) as http,
    ):
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            job_id = response.headers["x-resultity-job-id"]
            lines = response.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ") and json.loads(first[6:])["id"] == f"cmpl-{job_id}"
            # The one slot is taken while this stream is open.
            busy = await http.post("/v1/completions", json={"model": model, "prompt": "y"})
            assert busy.status_code == 429
        # Leaving the block closed the connection mid-stream.
        msg = await cancels.next_msg(timeout=20)
        assert msg.subject == settings.subject("cancel", job_id)
        assert msgpack.unpackb(msg.data) == {"job_id": job_id}

        await wait_for(lambda: _slot_free(http), 10)


async def _slot_taken(http: httpx.AsyncClient) -> bool:
    """Whether the gateway's one slot is held: a request for an unknown model is refused for
    lack of a slot (429) before its model is looked up (404)."""
    answer = await http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
    assert answer.status_code in (404, 429), answer.text
    return answer.status_code == 429


async def _slot_free(http: httpx.AsyncClient) -> bool:
    return not await _slot_taken(http)


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def test_a_body_that_drips_in_past_its_deadline_is_408_and_frees_its_slot(
    settings: Settings, snapshot: Snapshot
) -> None:
    """Issue 20 item 5: a client sending its body one byte at a time no longer holds its
    slot for as long as it likes; the whole body has `gateway_body_timeout_s`."""
    settings = settings.model_copy(
        update={"gateway_max_concurrent": 1, "gateway_body_timeout_s": 0.5}
    )
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
        + b"Content-Length: 100000\r\n\r\n"
    )
    async with (
        gateway(settings, port=0) as url,
        httpx.AsyncClient(base_url=url, headers=api_headers()) as http,
    ):
        reader, writer = await asyncio.open_connection(*_host_port(url))

        async def drip() -> None:
            writer.write(head)
            while True:  # a byte every tenth of a second: the body never ends
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            await wait_for(lambda: _slot_free(http), 30)
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await dripping
            writer.close()


async def test_client_gone_before_a_plain_answer_cancels_its_job_and_frees_its_slot(
    settings: Settings, snapshot: Snapshot, nc: Client
) -> None:
    """Issue 20 item 5: a client that leaves a non-streamed request no longer keeps its slot
    while its job runs on: the job is cancelled on the network and the slot is free."""
    settings = settings.model_copy(update={"gateway_max_concurrent": 1})
    model = snapshot.models[0].id
    jobs = await nc.subscribe(settings.subject("jobs", model))
    cancels = await nc.subscribe(settings.subject("cancel", ">"))
    body = json.dumps({"model": model, "prompt": "x"}).encode()
    request = (
        "POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    # No node serves: the job waits in the queue, its request with it.
    async with (
        gateway(settings, port=0) as url,
        httpx.AsyncClient(base_url=url, headers=api_headers()) as http,
    ):
        _, writer = await asyncio.open_connection(*_host_port(url))
        writer.write(request)
        await writer.drain()
        job_id = msgpack.unpackb((await jobs.next_msg(timeout=30)).data)["job_id"]
        assert await _slot_taken(http)
        writer.close()
        await writer.wait_closed()
        msg = await cancels.next_msg(timeout=30)
        assert msg.subject == settings.subject("cancel", job_id)
        assert msgpack.unpackb(msg.data) == {"job_id": job_id}
        await wait_for(lambda: _slot_free(http), 30)


async def test_stream_follows_the_nodes_signed_partial_output(
    settings: Settings, snapshot: Snapshot, nc: Client
) -> None:
    """The gateway forwards verified `stream` envelopes of the highest attempt, drops forged
    ones, and completes from the signed result (the node played at the NATS seam)."""
    from tests.support.gateway_node import play_node

    model = snapshot.models[0]
    async with gateway(settings, port=0) as url, client(url) as api:
        node = asyncio.create_task(play_node(nc, settings, model))
        stream = await api.chat.completions.create(
            model=model.id,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        deltas = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        final_text = await node
    assert "".join(deltas) == final_text
    assert "forged" not in "".join(deltas)
    # The partial output reached the client before the result: the first piece is attempt
    # 1's "Hel" (published before the result, on the same connection), not the final text.
    assert [d for d in deltas if d][0] == "Hel"


def readme_curl_examples() -> list[str]:
    text = README.read_text()
    section = text.split("## Gateway", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(curl .*?)```", section, flags=re.S)


def test_readme_has_curl_examples() -> None:
    assert len(readme_curl_examples()) >= 3


async def test_readme_curl_examples_run(settings: Settings, snapshot: Snapshot, nc: Client) -> None:
    model = snapshot.models[0].id
    async with serving_node(settings), gateway(settings, port=0) as url:
        for example in readme_curl_examples():
            command = example.replace("http://127.0.0.1:8000", url).replace("tiny-llama", model)
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "-euo",
                "pipefail",
                "-c",
                command,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=os.environ | {"RESULTITY_API_KEY": API_KEY},
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, (example, out, err)
            assert out.strip(), example


async def test_a_port_in_use_is_an_os_error_and_dev_goes_on_without_gateway(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.devtools.devnet import _gateway

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            async with gateway(settings, port=port):
                pass
        async with _gateway(settings, port):
            assert "dev_gateway_unavailable" in caplog.text


async def test_gateway_command_serves_until_sigterm(settings: Settings, snapshot: Snapshot) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    env |= {
        "RESULTITY_NATS_URL": settings.nats_url,
        "RESULTITY_AUTHORITY_KEYS": ",".join(settings.authority_keys),
        "RESULTITY_GATEWAY_API_KEYS_FILE": str(settings.gateway_api_keys_file),
        "RESULTITY_ADMISSION_REQUIRED": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "gateway",
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = re.search(r"(http://\S+)/v1 ", line)
        assert url, line
        async with httpx.AsyncClient(base_url=url.group(1), headers=api_headers()) as http:
            models = (await http.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [snapshot.models[0].id]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_the_dev_log_keeps_its_events_once_the_gateway_serves(
    settings: Settings, tmp_path: Path
) -> None:
    """Issue 20 item 8: uvicorn's logging set-up closed every handler, `dev.log`'s too, so the
    log went silent exactly when the gateway started."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    log_file = tmp_path / "dev.log"
    try:
        quiet_console(log_file)
        async with gateway(settings, port=0):
            logging.getLogger("worker.gateway.test").warning("event_while_serving")
        logging.getLogger("worker.gateway.test").warning("event_after_serving")
        for handler in root.handlers:
            if handler not in handlers:  # ours; another test's may hold a closed stream
                handler.flush()
        text = log_file.read_text()
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    for event in ("gateway_listening", "event_while_serving", "event_after_serving"):
        assert event in text


async def test_requests_read_the_watched_snapshot_with_no_kv_get_and_no_signature_check(
    settings: Settings,
    snapshot: Snapshot,
    authority: NodeKey,
    nc: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 26 item 5: the gateway fetched and verified the snapshot on every request. It
    now verifies each value once, as the watch delivers it, and keeps the highest of its own
    network. Counted at two seams: the JetStream API requests on the wire (a KV get is one)
    and the snapshot check."""
    checks: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        checks.append(1)
        return check_snapshot(*args, **kwargs)

    monkeypatch.setattr(gateway_snapshots, "check_snapshot", counted)
    api_requests: list[str] = []

    async def on_api_request(msg: Msg) -> None:
        api_requests.append(msg.subject)

    await nc.subscribe("$JS.API.>", cb=on_api_request)
    await nc.flush()
    model = snapshot.models[0].id

    async def models(http: httpx.AsyncClient) -> list[str]:
        return [m["id"] for m in (await http.get("/v1/models")).json()["data"]]

    def publish(**changes: Any) -> Awaitable[int]:
        body = snapshot.model_dump(mode="json") | changes
        envelope = authority.sign(EnvelopeType.CONFIG, body)
        return publish_snapshot(nc, config_bucket(settings), envelope)

    async with (
        gateway(settings, port=0) as url,
        httpx.AsyncClient(base_url=url, headers=api_headers()) as http,
    ):
        await nc.flush()
        api_requests.clear()  # the watch's set-up
        for _ in range(20):
            assert await models(http) == [model]
            missing = await http.post("/v1/completions", json={"model": "other", "prompt": "x"})
            assert missing.status_code == 404
        await nc.flush()
        assert [s for s in api_requests if ".GET." in s] == []
        assert len(checks) == 1

        # A newer snapshot reaches the requests through the watch; an older one, or one for
        # another network, does not replace it.
        renamed = [snapshot.models[0].model_dump(mode="json") | {"id": "renamed"}]
        await publish(version=snapshot.version + 1, models=renamed)

        async def renamed_served() -> bool:
            return await models(http) == ["renamed"]

        await wait_for(renamed_served, 30)
        await publish(version=snapshot.version)
        await publish(version=snapshot.version + 2, network="othernet")
        await publish(version=snapshot.version + 3, models=renamed, issued_at=1.0)
        await wait_for(lambda: len(checks) == 5, 30)
        [served] = (await http.get("/v1/models")).json()["data"]
        assert served["id"] == "renamed" and served["created"] == 1  # v+3's, verified
