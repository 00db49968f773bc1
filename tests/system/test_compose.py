"""The compose stack as an operator runs it: `stack prepare`, Debian's `docker-compose up`,
one job submitted from the host, a verified signed result, the dashboard's query for it
answered by the stack's Prometheus, and `down -v` leaving nothing."""

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.edges import unavailable
from tests.support.polling import wait_until
from worker.client import Outcome, connect, new_job_id, submit
from worker.core.settings import Settings
from worker.devtools.stack import COMPOSE_FILE, OBSERVABILITY, Stack, prepare
from worker.runtime.container import runtime_containers

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


def _compose(stack: Stack, project: str, *args: str, timeout: float = 300) -> str:
    command = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", project]
    command += ["--env-file", str(stack.env_file), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _logs(stack: Stack, project: str) -> str:
    try:
        return _compose(stack, project, "logs", "--no-color", "--tail", "60")
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        return f"(no logs: {exc})"


async def _submit(url: str, stack: Stack, prompt: str) -> Outcome:
    """As a client on the host: TLS with the stack's CA, the client role's nkey."""
    settings = Settings(
        nats_url=url,
        authority_keys=(stack.authority_id,),
        nats_ca=stack.dir / "tls" / "ca.pem",
        nats_nkey_seed_file=stack.dir / "creds" / "client.nk",
    )
    nc = await connect(settings)
    try:
        job = {
            "job_id": new_job_id(),
            "model_id": "echo-demo",
            "prompt": prompt,
            "params": {"max_tokens": 8, "seed": 7},
        }
        return await submit(nc, settings, job, wait_s=120)
    finally:
        await nc.close()


def _panel_query(title: str) -> str:
    dashboard = json.loads(
        (OBSERVABILITY / "grafana" / "dashboards" / "resultity-node.json").read_text()
    )
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    expr: str = panel["targets"][0]["expr"]
    return expr


def _prometheus(port: int, expr: str) -> list[tuple[dict[str, str], str]] | None:
    """The instant vector Prometheus answers for `expr`; None while it has no sample."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return None  # not up yet
    assert body["status"] == "success", body
    found = [(r["metric"], r["value"][1]) for r in body["data"]["result"]]
    return found or None


def test_compose_stack_serves_a_verified_result_from_the_host(
    docker_client: Any, tmp_path: Path
) -> None:
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (apt-get install docker-compose)")
    stack = prepare(tmp_path / "stack", client=docker_client)
    project = f"rsttest{uuid.uuid4().hex[:10]}"
    # An ephemeral port on 127.0.0.1, so parallel runs and a developer's stack do not clash.
    with stack.env_file.open("a") as env:
        for service in ("NATS", "METRICS", "PROMETHEUS", "GRAFANA"):
            env.write(f"RESULTITY_{service}_PUBLISH=127.0.0.1:\n")
    leftovers: list[Any] = []
    try:
        _compose(stack, project, "up", "-d")
        seeder_id = _compose(stack, project, "ps", "-q", "seeder").strip()
        status = docker_client.containers.get(seeder_id).wait(timeout=180)
        assert status["StatusCode"] == 0, f"seeder failed:\n{_logs(stack, project)}"
        host, port = _compose(stack, project, "port", "nats", "4222").strip().rsplit(":", 1)
        assert host == "127.0.0.1"
        try:
            outcome = asyncio.run(_submit(f"tls://127.0.0.1:{port}", stack, "compose says hi"))
        except TimeoutError as exc:
            raise AssertionError(f"no result:\n{_logs(stack, project)}") from exc
        # submit() has verified the signature and the input hash; the signer is our node.
        result = outcome.result
        assert result.node_id == stack.node_id
        assert result.model.id == "echo-demo"
        assert result.runtime.image == stack.runtime_image
        assert result.output.finish_reason == "length"
        assert len(result.output.token_ids) == 8
        host, port = _compose(stack, project, "port", "prometheus", "9090").strip().rsplit(":", 1)
        assert host == "127.0.0.1"
        expr = _panel_query("Tokens generated").replace("$model", ".*")
        try:
            answer = wait_until(lambda: _prometheus(int(port), expr), timeout=90)
        except TimeoutError as exc:
            raise AssertionError(f"no answer to {expr}:\n{_logs(stack, project)}") from exc
        assert answer == [({"model": "echo-demo"}, "8")], answer
    finally:
        _compose(stack, project, "down", "-v", "--timeout", "40")
        leftovers = runtime_containers(docker_client, stack.node_id)
        for container in leftovers:
            container.remove(force=True)
    assert not leftovers, "the agent left its runtime container behind"
