"""scripts/setup on a stock Debian 12: a minbase root filesystem made by mmdebstrap (as the
base images are, from this machine's apt sources), run as a container with network. With
RESULTITY_SETUP_MINIMAL=1 (no Docker engine, no extras) it must get to an importable
`resultity-node --help` through the virtual environment it creates (PEP 668: the system
interpreter is never touched)."""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from worker.devtools import images

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PIP_CONF = Path("/etc/pip.conf")
HOST_CA = "/etc/resultity-host-ca.pem"


def _checkout(target: Path) -> None:
    """The working tree as a clone would have it: tracked and not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _package_config() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """This machine's pip configuration, passed on as its apt sources are: the PIP_* and
    proxy variables, and the CA bundle pip trusts here (mounted beside the container's own
    bundle, which its ca-certificates package writes)."""
    skip = ("PIP_FIND_LINKS", "PIP_CERT")
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") and k not in skip}
    env |= {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}
    cert = os.environ.get("PIP_CERT", "")
    if not cert and PIP_CONF.is_file():
        for line in PIP_CONF.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cert":
                cert = value.strip()
    if not cert or not Path(cert).is_file():
        return env, {}
    env["PIP_CERT"] = HOST_CA
    return env, {cert: {"bind": HOST_CA, "mode": "ro"}}


@pytest.mark.timeout(1200)
def test_setup_on_stock_debian_12_reaches_resultity_node_help(
    docker_client: Any, tmp_path: Path
) -> None:
    if shutil.which("mmdebstrap") is None:
        if IN_CI:
            pytest.fail("mmdebstrap is not installed (scripts/setup installs it)")
        pytest.skip("mmdebstrap is not installed (scripts/setup installs it)")
    image = images.debian_image(
        docker_client, packages=(), variant="minbase", name="resultity/debian-stock"
    )
    src = tmp_path / "src"
    _checkout(src)
    env, volumes = _package_config()
    env |= {"RESULTITY_SETUP_MINIMAL": "1", "DEBIAN_FRONTEND": "noninteractive"}
    script = (
        "set -e; ! command -v python3 || echo 'python3 was already there'; "
        "cd /src && scripts/setup && .venv/bin/resultity-node --help"
    )
    container = docker_client.containers.run(
        image,
        ["bash", "-c", script],
        environment=env,
        volumes={str(src): {"bind": "/src", "mode": "rw"}, **volumes},
        detach=True,
        labels={"org.resultity.test": "setup-debian"},
    )
    try:
        status = container.wait(timeout=1100)
        logs = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, logs[-6000:]
    assert "usage: resultity-node" in logs, logs[-6000:]
    assert "python3 was already there" not in logs, "the base is not stock: it has python3"
    assert "starting dockerd" not in logs
