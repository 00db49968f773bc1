"""The official `openai` client against the gateway `resultity-node dev` serves, with the API
key dev printed (and wrote to client.json): the quick start's way in for an OpenAI user; and
`submit`/`status` from another shell with nothing but the dev home."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.support.polling import wait_until
from worker.devtools.devhome import CLIENT_FILE

pytestmark = pytest.mark.nats

KEY_LINE = re.compile(r"gateway (http://\S+)/v1, API key (\S+) ")


def test_openai_client_works_with_the_printed_key(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    log = tmp_path / "console.txt"
    with log.open("w") as console:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli.main", "dev", "--port", "0", "--gateway-port", "0"]
            + ["--engine", "echo", "--backend", "process", "--home", str(home)],
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        printed = wait_until(lambda: KEY_LINE.search(log.read_text()), timeout=120)
        url, key = printed.group(1), printed.group(2)
        wait_until(lambda: "first result" in log.read_text(), timeout=120)
        dev = json.loads((home / CLIENT_FILE).read_text())
        assert dev["gateway_url"] == f"{url}/v1" and dev["gateway_api_key"] == key
        assert (home / CLIENT_FILE).stat().st_mode & 0o777 == 0o600

        api = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        [model] = [m.id for m in api.models.list().data]
        answer = api.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert answer.headers["x-resultity-node-id"] == dev["node_id"]
        assert answer.parse().choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        # The client commands reach the TLS, per-role network through client.json alone.
        shell = env | {"RESULTITY_DEV_HOME": str(home)}
        for command in (["submit", "Hello", "--json"], ["status"]):
            done = subprocess.run(
                [sys.executable, "-m", "worker.cli.main", *command],
                env=shell,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert f"network: dev at {dev['nats_url']}" in done.stderr
            assert dev["nats_url"].startswith("tls://")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
