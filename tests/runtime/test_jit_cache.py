"""The runtime's compile cache (issue 23 item 1): a shared object written by the runtime into
`/jit` loads as code; the same bytes written into `/tmp` do not. Inside the real hardened
container, as the runtime user; the object is a tiny C library built on the host (the echo
image has no compiler), its bytes carried in by the probe itself, which writes and loads it
the way an engine writes and loads a kernel it compiled."""

import asyncio
import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_runtime_image import echo_image
from tests.support.settings import MODEL_SHA, NODE_ID, make_settings
from worker.runtime.api import LaunchSpec
from worker.runtime.container import JIT_MOUNT, DockerBackend
from worker.runtime.supervisor import Supervisor

pytestmark = pytest.mark.docker

SOURCE = "int answer(void) { return 42; }\n"

PROBE = r"""
import base64, ctypes, json, os, stat, sys
data = base64.b64decode(sys.argv[1])
out = {}
for where in sys.argv[2:]:
    path = os.path.join(where, "kernel.so")
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(where)
    fact = {"owner": st.st_uid, "mode": oct(stat.S_IMODE(st.st_mode))}
    try:
        fact["answer"] = ctypes.CDLL(path).answer()
    except OSError as exc:
        fact["error"] = str(exc)
    out[where] = fact
print(json.dumps(out))
"""


def shared_object(tmp_path: Path) -> bytes:
    """A position-independent library with no libc dependency: loads in any image."""
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.fail("no C compiler (cc) on this machine: install one (Debian: gcc)")
    (tmp_path / "kernel.c").write_text(SOURCE)
    out = tmp_path / "kernel.so"
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-O2",
            "-o",
            str(out),
            str(tmp_path / "kernel.c"),
        ],
        check=True,
    )
    return out.read_bytes()


async def test_compiled_code_loads_from_the_jit_cache_and_not_from_tmp(
    docker_client: Any, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir(mode=0o755)
    spec = LaunchSpec("echo", echo_image(docker_client), model, MODEL_SHA, {})
    settings = make_settings(fast_runtime=True, runtime_jit_cache="16m")
    code = base64.b64encode(shared_object(tmp_path)).decode()
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)
    async with Supervisor(settings, backend, spec) as sup:
        container = docker_client.containers.get(sup.stats().runtime_id)
        status, output = await asyncio.to_thread(
            container.exec_run, ["python3", "-c", PROBE, code, JIT_MOUNT, "/tmp"]
        )
    assert status == 0, output
    facts = json.loads(output)
    uid = int(settings.runtime_user.split(":")[0])
    assert facts[JIT_MOUNT] == {"owner": uid, "mode": "0o700", "answer": 42}
    assert "answer" not in facts["/tmp"]
    assert "failed to map segment" in facts["/tmp"]["error"]
