"""The README's quick start, as a new user runs it.

`test_quick_start_in_a_terminal` drives it as a person would: `scripts/quickstart` in a
terminal (a tmux session), the printed client commands typed in a second shell with no
`RESULTITY_*` variable, then Ctrl-C. The echo engine keeps it fast; the vLLM tests run the
real engine on the demo model and on a model directory of the user's (`dev --model DIR`).
"""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.polling import wait_until
from worker.devtools import images
from worker.devtools.devhome import CLIENT_FILE
from worker.runtime.container import runtime_containers

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
NO_TRACEBACK = ("Traceback", "never retrieved", "Exception ignored")
EXITED = r"^quickstart-exit=(\d+)"
NEVER = r"(?!)"


class Terminal:
    """A tmux session on its own server, its output copied to a file as it is written."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.socket = f"rst-quickstart-{uuid.uuid4().hex[:8]}"
        self.output = tmp / "terminal.out"
        self.output.touch()
        self.env = env
        self._tmux("new-session", "-d", "-s", "qs", "-x", "200", "-y", "50", "bash --norc")
        self._tmux("pipe-pane", "-t", "qs", "-o", f"cat >> {shlex.quote(str(self.output))}")

    def _tmux(self, *args: str) -> None:
        subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, check=True, timeout=30)

    def type(self, line: str) -> None:
        self._tmux("send-keys", "-t", "qs", "-l", line)
        self._tmux("send-keys", "-t", "qs", "Enter")

    def interrupt(self) -> None:
        self._tmux("send-keys", "-t", "qs", "C-c")

    def text(self) -> str:
        return self.output.read_text(errors="replace").replace("\r", "")

    def wait_for(self, pattern: str, timeout_s: float, *, unless: str = EXITED) -> re.Match[str]:
        """The first match of `pattern` in the output, once the terminal has written it;
        fails at once when `unless` shows up first (the quick start ended)."""

        def probe() -> re.Match[str] | None:
            text = self.text()
            if (found := re.search(pattern, text, re.MULTILINE)) is None and re.search(
                unless, text, re.MULTILINE
            ):
                raise AssertionError(f"no {pattern!r}, the quick start ended:\n{text}")
            return found

        try:
            return wait_until(probe, timeout=timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"no {pattern!r} within {timeout_s:.0f}s:\n{self.text()}"
            ) from None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, check=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def terminal(tmp_path: Path, home: Path) -> Iterator[Terminal]:
    """A user's terminal: HOME is a fresh directory, no RESULTITY_* variable except where the
    project's virtual environment is (this interpreter's) and the image build cache (so that
    images and wheels built before are reused)."""
    if subprocess.run(["sh", "-c", "command -v tmux"], capture_output=True).returncode != 0:
        if IN_CI:
            pytest.fail("tmux is not installed (scripts/setup installs it)")
        pytest.skip("tmux is not installed (scripts/setup installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESULTITY_", "TMUX"))}
    env |= {
        "HOME": str(home),
        "RESULTITY_VENV": sys.prefix,
        "RESULTITY_BUILD_CACHE": str(images.cache_dir()),
    }
    term = Terminal(tmp_path, env)
    try:
        yield term
    finally:
        term.close()


def second_shell(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    """Run `command` as typed in another shell of the same user: no RESULTITY_* at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    env["HOME"] = str(home)
    return subprocess.run(
        ["bash", "-c", command],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.docker
@pytest.mark.nats
@pytest.mark.timeout(1200)
def test_quick_start_in_a_terminal(docker_client: Any, terminal: Terminal, home: Path) -> None:
    terminal.type(
        f"cd {shlex.quote(str(REPO))} && scripts/quickstart --engine echo --port 0; "
        "echo quickstart-exit=$?"
    )
    terminal.wait_for(r"=== verified signed result ===", 1100)
    terminal.wait_for(r"^Full log: ", 60)
    out = terminal.text()
    # The console: steps with timings, the result, a note on its text, the commands to try.
    for step in ("NATS up at", "keys: node", "model echo-demo", "image: echo runtime"):
        assert re.search(rf"^ +\d+\.\ds  {step}", out, re.MULTILINE), (step, out)
    assert "node serving echo-demo" in out
    assert "(Ed25519 signature verified)" in out
    assert "note: the echo engine runs no model" in out
    assert "image_build" not in out and "INFO" not in out, "the console is not quiet"
    log_file = Path(terminal.wait_for(r"full log in (\S+)", 1).group(1))
    assert log_file.parent == home / ".resultity" / "dev"
    assert "dev_client_file_written" in log_file.read_text()  # the events the console hides

    dev = json.loads((log_file.parent / CLIENT_FILE).read_text())
    node_id = dev["node_id"]
    assert runtime_containers(docker_client, node_id), "the node serves from no container"

    commands = re.findall(r"^  (\S.* (?:submit|status)\b.*)$", out, re.MULTILINE)
    assert len(commands) == 2, out
    submitted = second_shell(commands[0], home)
    assert submitted.returncode == 0, submitted.stderr
    assert "(Ed25519 signature verified)" in submitted.stdout
    assert f"network: dev at {dev['nats_url']}" in submitted.stderr
    status = second_shell(commands[1], home)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"node      {node_id}", status.stdout
    assert "state     serving" in status.stdout, status.stdout
    assert f"network: dev at {dev['nats_url']}" in status.stderr

    terminal.interrupt()
    code = terminal.wait_for(EXITED, 120, unless=NEVER).group(1)
    out = terminal.text()
    assert code in ("0", "130"), out
    assert "node stopped" in out
    docker_client.ping()  # the Docker daemon still answers after the terminal's Ctrl-C
    assert runtime_containers(docker_client, node_id) == []
    assert "runtime_container_removed" in log_file.read_text()
    assert not (log_file.parent / CLIENT_FILE).exists()
    for bad in NO_TRACEBACK:
        assert bad not in out, out
    gone = second_shell(commands[0].replace(' "Hello"', " Hi --timeout 5"), home)
    assert gone.returncode == 2 and "no running dev network" in gone.stderr, gone.stderr


FAKE_DOCKERD = """#!{python}
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_DFL)  # as Go's runtime does for dockerd
with open(os.environ["FAKE_DOCKERD_PID"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""
FAKE_DOCKER = """#!/bin/sh
[ "$1" = info ] && [ -s "$FAKE_DOCKERD_PID" ] && kill -0 "$(cat "$FAKE_DOCKERD_PID")"
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ctrl_c_in_the_setup_terminal_spares_the_docker_daemon(
    terminal: Terminal, tmp_path: Path
) -> None:
    """scripts/setup starts dockerd when none answers (here a stand-in that, like dockerd,
    dies of SIGINT); a Ctrl-C in that terminal afterwards must not reach it."""
    if os.geteuid() != 0:
        pytest.skip("setup starts dockerd through sudo, whose PATH would not find the stand-in")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "dockerd").write_text(FAKE_DOCKERD.format(python=sys.executable))
    (fakes / "docker").write_text(FAKE_DOCKER)
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    pid_file = tmp_path / "dockerd.pid"
    terminal.type(
        f"export PATH={shlex.quote(str(fakes))}:$PATH FAKE_DOCKERD_PID={pid_file} "
        f"DOCKERD_LOG={tmp_path / 'dockerd.log'}; cd {shlex.quote(str(REPO))}; "
        "bash -c 'scripts/setup && echo setup-done && exec sleep 600'"
    )
    terminal.wait_for(r"^setup-done", 600)
    assert "starting dockerd detached" in terminal.text()
    pid = int(pid_file.read_text())
    try:
        terminal.interrupt()
        terminal.type("echo quickstart-exit=$?")  # the shell reads it once the job has ended
        assert terminal.wait_for(EXITED, 60, unless=NEVER).group(1) == "130"
        assert alive(pid), "the terminal's Ctrl-C reached the Docker daemon"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def run_dev(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", "dev", "--once", "--port", "0"]
        + ["--home", str(home), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )


@pytest.mark.nats
@pytest.mark.timeout(300)
def test_dev_output_has_no_traceback(tmp_path: Path) -> None:
    """The normal path, runtime as a local process: steps, result, no traceback anywhere."""
    proc = run_dev(tmp_path / "dev", "--engine", "echo", "--backend", "process")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "=== verified signed result ===" in proc.stdout
    assert "first result: signed by the node, verified here" in proc.stderr
    for bad in NO_TRACEBACK:
        assert bad not in proc.stdout + proc.stderr, proc.stderr


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1500)
def test_dev_prints_a_verified_signed_vllm_result(docker_client: object, tmp_path: Path) -> None:
    proc = run_dev(tmp_path / "dev", "--prompt", "Hello from the quick start")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "=== verified signed result ===" in out
    assert "(Ed25519 signature verified)" in out
    assert "runtime    vllm " in out, out
    assert "model      tiny-llama" in out
    assert "(matches the bytes sent)" in out
    assert "the demo model has random weights" in out
    for bad in NO_TRACEBACK:
        assert bad not in out + proc.stderr, proc.stderr


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1500)
def test_dev_serves_a_model_directory(docker_client: object, tmp_path: Path) -> None:
    """`dev --model DIR`: a Hugging Face directory of the user's (here a second tiny Llama,
    other seed and shape than the demo's) is packed, published, validated and served."""
    from worker.devtools.demomodel import make_tiny_llama

    model = make_tiny_llama(tmp_path / "my-llama", seed=7, layers=1)
    proc = run_dev(tmp_path / "dev", "--model", str(model), "--prompt", "The quick brown")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "model      my-llama v1" in out, out
    assert "runtime    vllm " in out, out
    assert "(Ed25519 signature verified)" in out
    assert "random weights" not in out
    # two prompts and a chat: the directory ships a chat template (see has_chat_template)
    assert "validation vectors: 3 from the reference run" in proc.stderr
    for bad in NO_TRACEBACK:
        assert bad not in out + proc.stderr, proc.stderr
