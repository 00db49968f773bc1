"""What the gateway tests share: a node's settings on the test network, that node serving
in-process, an OpenAI client for the gateway, and the check of an answer's provenance."""

import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai

from schemas.snapshot import Snapshot
from tests.support.agent import running, serving
from tests.support.settings import make_settings
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.natsd import NatsServer
from worker.node.agent import Agent

API_KEY = "rst-test-gateway-key"
OTHER_API_KEY = "rst-test-other-key"


def node_settings(
    nats_server: NatsServer, tmp_path: Path, authority: NodeKey, **extra: Any
) -> Settings:
    """A node homed in `tmp_path` that trusts `authority`, its runtime a local process; the
    gateway on these settings takes `API_KEY`."""
    keys = tmp_path / "gateway.keys"
    if not keys.exists():
        keys.write_text(f"{OTHER_API_KEY}\n{API_KEY}\n")
    values: dict[str, Any] = {
        "gateway_api_keys_file": keys,
        "nats_url": nats_server.url,
        "authority_keys": (authority.node_id,),
        "runtime_backend": "process",
        "ack_wait_s": 10,
        "shutdown_grace_s": 5,
    }
    return make_settings(tmp_path, **(values | extra))


@contextlib.asynccontextmanager
async def serving_node(settings: Settings, timeout: float = 60) -> AsyncIterator[Agent]:
    """An agent in-process, once it serves its model, until the block ends."""
    async with running(settings) as agent:
        await serving(agent, timeout)
        yield agent


def client(url: str, api_key: str = "") -> openai.AsyncOpenAI:
    """The official client for the gateway at `url` with an API key, without retries."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or API_KEY, max_retries=0)


def api_headers(api_key: str = "") -> dict[str, str]:
    """The header of an authorized plain HTTP request to the gateway."""
    return {"Authorization": f"Bearer {api_key or API_KEY}"}


def verify_cli(envelope_b64: str) -> dict[str, Any]:
    """`resultity-node verify` on the answer's envelope: the body it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "verify", "-"],
        input=base64.b64decode(envelope_b64),
        capture_output=True,
        check=True,
        timeout=60,
    )
    verified: dict[str, Any] = json.loads(done.stdout)
    assert verified["typ"] == "result"
    body: dict[str, Any] = verified["body"]
    assert verified["signer"] == body["node_id"]
    return body


def check_provenance(resultity: dict[str, Any], snapshot: Snapshot, text: str) -> dict[str, Any]:
    """The answer's `resultity` field against its signed result (checked by the CLI)."""
    body = verify_cli(resultity["envelope"])
    assert body["job_id"] == resultity["job_id"] and body["node_id"] == resultity["node_id"]
    assert body["model"]["sha256"] == resultity["model_sha256"] == snapshot.models[0].sha256
    assert body["input_sha256"] == resultity["input_sha256"]
    assert body["output"]["text"] == text
    return body
