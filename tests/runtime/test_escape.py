"""Escape surface of a runtime container started by the supervisor, tried from inside: the
network (host services on loopback, the Docker bridge, the host's address, the outside),
writes outside /tmp, executing from /tmp, the agent's files and host paths, privilege gain
(setuid, user and mount namespaces, mount), and the Docker socket. Everything must fail.
`tests/runtime/test_container.py` covers interfaces, read-only root, capabilities and uid."""

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_runtime_image import echo_image
from tests.support.settings import MODEL_SHA, NODE_ID, make_settings
from worker.runtime.api import LaunchSpec
from worker.runtime.container import LABEL_NODE, DockerBackend
from worker.runtime.supervisor import Supervisor

pytestmark = pytest.mark.docker

PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, sys

TARGETS = json.loads(sys.argv[1])
out = {}

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
    except Exception as exc:
        return type(exc).__name__

def tcp(host, port):
    def go():
        s = socket.create_connection((host, port), timeout=3)
        s.close()
    return attempt(go)

def udp(host, port):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", (host, port))
        s.close()
    return attempt(go)

out["tcp"] = {f"{h}:{p}": tcp(h, p) for h, p in TARGETS["tcp"]}
out["udp"] = {f"{h}:{p}": udp(h, p) for h, p in TARGETS["tcp"]}
out["dns"] = attempt(lambda: socket.getaddrinfo("example.com", 443))

def write(path):
    def go():
        with open(path, "w") as f:
            f.write("x")
    return attempt(go)

out["writes"] = {p: write(p) for p in TARGETS["writes"]}
out["mkdir"] = {d: attempt(lambda d=d: os.mkdir(d)) for d in TARGETS["dirs"]}
out["tmp_write"] = write("/tmp/probe.sh")

def exec_tmp():
    with open("/tmp/run.sh", "w") as f:
        f.write("#!/bin/sh\necho escaped\n")
    os.chmod("/tmp/run.sh", 0o755)
    subprocess.run(["/tmp/run.sh"], check=True, capture_output=True)
out["exec_from_tmp"] = attempt(exec_tmp)

out["exists"] = {p: os.path.exists(p) for p in TARGETS["paths"]}
out["docker_env"] = sorted(k for k in os.environ if k.startswith("DOCKER"))
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["caps"] = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
out["seccomp"] = status["Seccomp"].strip()

libc = ctypes.CDLL(None, use_errno=True)
def syscall(fn):
    def go():
        if fn() != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return attempt(go)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
out["unshare_user"] = syscall(lambda: libc.unshare(CLONE_NEWUSER))
out["unshare_mount"] = syscall(lambda: libc.unshare(CLONE_NEWNS))
out["unshare_net"] = syscall(lambda: libc.unshare(CLONE_NEWNET))
out["mount_tmpfs"] = syscall(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
out["setuid_root"] = attempt(lambda: os.setuid(0))
out["setgid_root"] = attempt(lambda: os.setgid(0))
out["chroot"] = attempt(lambda: os.chroot("/tmp"))
out["uid_after"] = [os.getuid(), os.geteuid()]

# setuid-root binaries: with no-new-privileges they run with our uid, so they gain nothing
setuid = []
for d in ("/bin", "/usr/bin", "/sbin", "/usr/sbin"):
    try:
        names = os.listdir(d)
    except OSError:
        continue
    for n in names:
        p = os.path.join(d, n)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_mode & 0o4000 and st.st_uid == 0:
            setuid.append(p)
out["setuid_binaries"] = sorted(set(setuid))
ran = {}
for cmd in (["mount", "-t", "tmpfs", "none", "/mnt"], ["unshare", "-r", "id", "-u"],
            ["su", "-c", "id -u", "root"]):
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        ran[cmd[0]] = [r.returncode, r.stdout.decode(errors="replace").strip()]
    except FileNotFoundError:
        ran[cmd[0]] = "absent"
    except Exception as exc:
        ran[cmd[0]] = type(exc).__name__
out["commands"] = ran
print(json.dumps(out))
"""


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP service on every host address: what the runtime must not reach."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()
    accepted: list[Any] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except OSError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert accepted == [], f"the runtime reached a host service: {accepted}"


def host_addresses() -> list[str]:
    found = {"127.0.0.1", "172.17.0.1"}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outbound address
            found.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(found)


async def test_nothing_escapes_the_runtime_container(
    docker_client: Any, tmp_path: Path, host_listener: int
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.bin").write_bytes(b"m" * 100)
    (model / "model.bin").chmod(0o644)
    model.chmod(0o755)
    key_file = tmp_path / "node.key"
    key_file.write_bytes(b"\0" * 32)
    settings = make_settings(fast_runtime=True, key_file=key_file, cache_dir=tmp_path / "cache")
    spec = LaunchSpec("echo", echo_image(docker_client), model, MODEL_SHA, {})
    targets = {
        "tcp": [[h, host_listener] for h in host_addresses()]
        + [["1.1.1.1", 53], ["8.8.8.8", 443], ["93.184.216.34", 80]],
        "writes": [
            "/escape",
            "/etc/escape",
            "/etc/hosts",
            "/etc/passwd",
            "/usr/escape",
            "/var/escape",
            "/var/tmp/escape",
            "/root/escape",
            "/model/escape",
            "/model/model.bin",
            "/proc/sys/kernel/hostname",
            "/sys/kernel/uevent_helper",
        ],
        "dirs": ["/escape-dir", "/model/dir", "/var/tmp/dir"],
        "paths": [
            str(key_file),
            str(tmp_path),
            str(Path.home() / ".resultity"),
            str(Path(__file__).resolve().parent),
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/run/containerd/containerd.sock",
            "/root/.docker",
            "/host",
            "/proc/1/root/var/run/docker.sock",
        ],
    }
    backend = DockerBackend(settings, node_id=NODE_ID, client=docker_client)
    async with Supervisor(settings, backend, spec) as sup:
        container = docker_client.containers.get(sup.stats().runtime_id)
        code, output = await asyncio.to_thread(
            container.exec_run, ["python3", "-c", PROBE, json.dumps(targets)]
        )
    assert code == 0, output
    got = json.loads(output)
    print(json.dumps(got, indent=1))  # noqa: T201  (shown on failure)

    # network: no route anywhere (only `lo` exists); loopback is the container's own
    for target, result in got["tcp"].items():
        assert result != "ok", target
        if not target.startswith("127."):
            assert result in {"ENETUNREACH", "EHOSTUNREACH", "EPERM"}, (target, result)
    assert all(r != "ok" for t, r in got["udp"].items() if not t.startswith("127.")), got["udp"]
    assert got["dns"] != "ok"

    # filesystem: only /tmp takes writes, and nothing there can be executed
    assert all(r != "ok" for r in got["writes"].values()), got["writes"]
    assert all(r != "ok" for r in got["mkdir"].values()), got["mkdir"]
    assert got["tmp_write"] == "ok"
    assert got["exec_from_tmp"] in {"EACCES", "PermissionError"}, got["exec_from_tmp"]

    # the agent's files, host paths and the Docker socket are not there
    assert not any(got["exists"].values()), got["exists"]
    assert got["docker_env"] == []

    # privileges: none held, none to gain
    assert got["no_new_privs"] == "1"
    assert all(int(v, 16) == 0 for v in got["caps"].values()), got["caps"]
    for name in ("unshare_user", "unshare_mount", "unshare_net", "mount_tmpfs"):
        assert got[name] in {"EPERM", "EINVAL", "ENOSYS", "EACCES"}, (name, got[name])
    for name in ("setuid_root", "setgid_root", "chroot"):
        assert got[name] == "EPERM", (name, got[name])
    assert got["uid_after"][0] != 0 and got["uid_after"][1] != 0
    for cmd, result in got["commands"].items():
        if result == "absent":
            continue
        assert isinstance(result, list) and (result[0] != 0 or result[1] != "0"), (cmd, result)
    left = docker_client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={NODE_ID}"})
    assert left == []
