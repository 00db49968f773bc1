"""`resultity-node doctor`: can this machine run a hardened runtime, on the GPUs it names?

Each check gives a `Finding` that says what was seen and, when something is wrong, how to
fix it. The checks run in order and later ones build on earlier ones: the NVIDIA driver
and its GPUs (through `GpuInventory`, the seam tests double), the chosen GPUs, the
container toolkit, then one real hardened runtime container (the node's own
`create_kwargs`, checked by `check_isolation`) that reports from inside which GPUs it sees
and whether a compiled library loads from its JIT cache (and not from /tmp), and free GPU
memory. On a machine without GPUs it says so and checks the rest. Blocking throughout: a
command-line tool.
"""

import base64
import enum
import json
import logging
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.core.errors import IsolationError
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.container import (
    JIT_MOUNT,
    check_isolation,
    create_kwargs,
    expected_env,
    remove_container,
)
from worker.runtime.hardware import (
    Gpu,
    GpuInventory,
    NvidiaSmi,
    chosen_gpus,
    node_execution_class,
)

log = logging.getLogger(__name__)

DOCTOR_NODE = "doctor"
PROBE_TIMEOUT_S = 60
KERNEL_SOURCE = "int answer(void) { return 42; }\n"

PROBE = r"""
import base64, ctypes, glob, json, os, shutil, subprocess, sys
facts = {"uid": os.getuid(), "nvidia_devices": sorted(glob.glob("/dev/nvidia[0-9]*"))}
smi = shutil.which("nvidia-smi")
if smi:
    run = subprocess.run([smi, "--query-gpu=uuid", "--format=csv,noheader"],
                         capture_output=True, text=True)
    facts["gpu_uuids"] = [l.strip() for l in run.stdout.splitlines() if l.strip()]
if len(sys.argv) > 1:
    data = base64.b64decode(sys.argv[1])
    for where in sys.argv[2:]:
        path = os.path.join(where, "doctor-kernel.so")
        try:
            with open(path, "wb") as f:
                f.write(data)
            facts[where] = ctypes.CDLL(path).answer()
        except OSError as exc:
            facts[where] = str(exc)
print(json.dumps(facts))
"""


class Status(enum.Enum):
    OK = "ok"
    FAIL = "FAIL"
    SKIP = "skip"
    INFO = "info"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.status.value:<4}  {self.check}: {self.detail}"]
        if self.fix:
            out.append(f"      fix: {self.fix}")
        return out


def examine(
    settings: Settings,
    *,
    image: str | None,
    client: Any | None,
    inventory: GpuInventory | None = None,
) -> list[Finding]:
    """Every check, in order (see the module docstring). `client` None: Docker is not
    reachable (the caller says why); `image` None: no runtime image to probe with."""
    inventory = inventory or NvidiaSmi()
    findings: list[Finding] = []
    gpus = inventory.gpus()
    wanted = settings.gpu_ids()
    findings += _driver(settings, gpus)
    chosen = chosen_gpus(settings, gpus)
    if wanted is not None and gpus is not None:
        findings.append(_chosen(settings, gpus, chosen))
    findings.append(
        Finding(
            "execution class",
            Status.INFO,
            f"{node_execution_class(settings, _Known(gpus))} (a snapshot's classes must "
            "list it for this node to serve)",
        )
    )
    if client is None:
        findings.append(
            Finding(
                "docker",
                Status.FAIL,
                "no Docker engine answers",
                "start dockerd (`systemctl start docker`) and let this user reach "
                "/var/run/docker.sock (group `docker`), or set DOCKER_HOST",
            )
        )
        return findings
    findings.append(Finding("docker", Status.OK, f"engine {client.version().get('Version')}"))
    if wanted is not None:
        findings.append(_toolkit(client))
    if image is None:
        findings.append(Finding("runtime container", Status.SKIP, "no runtime image to probe"))
    else:
        findings += _container(settings, client, image, chosen if wanted is not None else None)
    if chosen:
        findings += _memory(settings, chosen)
    return findings


class _Known:
    """An inventory that answers what was already asked (the driver is asked once)."""

    def __init__(self, gpus: list[Gpu] | None) -> None:
        self._gpus = gpus

    def gpus(self) -> list[Gpu] | None:
        return self._gpus


def _driver(settings: Settings, gpus: list[Gpu] | None) -> list[Finding]:
    if gpus is None or not gpus:
        if settings.gpu_ids() is None:
            return [
                Finding(
                    "nvidia driver",
                    Status.INFO,
                    "no NVIDIA GPU on this machine (no driver answers): a CPU-only node; "
                    "the GPU checks are skipped",
                )
            ]
        return [
            Finding(
                "nvidia driver",
                Status.FAIL,
                f"RESULTITY_GPUS={settings.gpus} but no NVIDIA driver answers (nvidia-smi "
                "is missing or lists no GPU)",
                "install the NVIDIA driver for these GPUs (`nvidia-smi` must list them), "
                "or unset RESULTITY_GPUS for a CPU node",
            )
        ]
    listed = "; ".join(f"{g.index}: {g.name} {g.uuid}" for g in gpus)
    found = Finding(
        "nvidia driver", Status.OK, f"driver {gpus[0].driver_version}, {len(gpus)} GPU(s): {listed}"
    )
    if settings.gpu_ids() is None:
        return [
            found,
            Finding(
                "gpus",
                Status.INFO,
                "RESULTITY_GPUS is unset: the runtime runs on CPU and no GPU is used",
                "set RESULTITY_GPUS=all, or to the indices or UUIDs this node may use",
            ),
        ]
    return [found]


def _chosen(settings: Settings, gpus: Sequence[Gpu], chosen: Sequence[Gpu]) -> Finding:
    wanted = settings.gpu_ids() or ()
    seen = {str(g.index) for g in chosen} | {g.uuid for g in chosen}
    missing = [w for w in wanted if w not in seen]
    if missing:
        return Finding(
            "chosen gpus",
            Status.FAIL,
            f"RESULTITY_GPUS names {', '.join(missing)}, which the driver does not list",
            "`nvidia-smi -L` lists this machine's GPUs: set RESULTITY_GPUS to indices or "
            "UUIDs from it",
        )
    return Finding("chosen gpus", Status.OK, ", ".join(f"{g.index} ({g.uuid})" for g in chosen))


def _toolkit(client: Any) -> Finding:
    info = client.info()
    runtimes = set(info.get("Runtimes") or {})
    cdi = [d for d in info.get("CDISpecDirs") or [] if Path(d).is_dir() and any(Path(d).iterdir())]
    hook = shutil.which("nvidia-container-runtime-hook") or shutil.which("nvidia-ctk")
    if "nvidia" in runtimes or cdi or hook:
        how = "nvidia runtime" if "nvidia" in runtimes else ("CDI specs" if cdi else hook)
        return Finding("container toolkit", Status.OK, f"found ({how})")
    return Finding(
        "container toolkit",
        Status.FAIL,
        "Docker cannot hand GPUs to containers: no NVIDIA Container Toolkit "
        f"(runtimes: {', '.join(sorted(runtimes)) or 'none'})",
        "install the NVIDIA Container Toolkit, run `nvidia-ctk runtime configure "
        "--runtime=docker` and restart dockerd",
    )


def _container(
    settings: Settings, client: Any, image: str, chosen: Sequence[Gpu] | None
) -> list[Finding]:
    findings: list[Finding] = []
    kernel = _kernel()
    command: list[str] = []
    if kernel is not None:
        command += [base64.b64encode(kernel).decode(), JIT_MOUNT, "/tmp"]
    with tempfile.TemporaryDirectory(prefix="resultity-doctor-") as model_dir:
        Path(model_dir).chmod(0o755)
        spec = LaunchSpec("echo", image, Path(model_dir), "", {})
        kwargs = create_kwargs(
            spec,
            settings,
            node_id=DOCTOR_NODE,
            name=f"resultity-doctor-{uuid.uuid4().hex[:8]}",
            command=command,
            extra_env={},
        )
        kwargs["entrypoint"] = ["python3", "-c", PROBE]  # instead of the runtime
        container = None
        try:
            container = client.containers.create(**kwargs)
            container.reload()
            image_env = (client.api.inspect_image(image).get("Config") or {}).get("Env") or []
            check_isolation(
                container.attrs,
                settings,
                spec=spec,
                expected_env=expected_env(spec, settings, extra_env={}),
                image_env=image_env,
            )
            findings.append(
                Finding("hardened container", Status.OK, "created and checked (isolation holds)")
            )
            container.start()
            status = container.wait(timeout=PROBE_TIMEOUT_S)
            out = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
            if status.get("StatusCode") != 0:
                err = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
                raise RuntimeError(f"probe exited {status.get('StatusCode')}: {err[-500:]}")
            facts = json.loads(out.strip().splitlines()[-1])
        except IsolationError as exc:
            return [
                Finding(
                    "hardened container",
                    Status.FAIL,
                    str(exc),
                    "Docker does not apply what the node asks (see the fields named): check "
                    "the daemon's configuration (default runtime, security options)",
                )
            ]
        except Exception as exc:  # Docker's own errors, a probe that failed: all reported
            return [
                *findings,
                Finding(
                    "runtime container",
                    Status.FAIL,
                    f"could not run the probe in image {image[:19]}: {exc}",
                    "with GPUs: install the NVIDIA Container Toolkit; otherwise see "
                    "`docker info` and the daemon's log",
                ),
            ]
        finally:
            if container is not None:
                remove_container(client, container.id)
    findings.append(
        Finding("runtime container", Status.OK, f"ran as uid {facts.get('uid')}, no network")
    )
    if chosen is not None:
        findings.append(_visible(chosen, facts))
    findings.append(_jit(facts, kernel is not None))
    return findings


def _visible(chosen: Sequence[Gpu], facts: dict[str, Any]) -> Finding:
    uuids = facts.get("gpu_uuids")
    if uuids is not None:
        if sorted(uuids) == sorted(g.uuid for g in chosen):
            return Finding("gpus in the container", Status.OK, f"exactly {', '.join(uuids)}")
        return Finding(
            "gpus in the container",
            Status.FAIL,
            f"the container sees {uuids or 'no GPU'}, not {[g.uuid for g in chosen]}",
            "check RESULTITY_GPUS and the toolkit's configuration (NVIDIA_VISIBLE_DEVICES "
            "in the image must not override the device request)",
        )
    devices = facts.get("nvidia_devices") or []
    if len(devices) == len(chosen):
        return Finding("gpus in the container", Status.OK, f"{len(devices)} GPU device(s)")
    return Finding(
        "gpus in the container",
        Status.FAIL,
        f"the container has {len(devices)} GPU device(s), {len(chosen)} chosen",
        "check RESULTITY_GPUS and the NVIDIA Container Toolkit's configuration",
    )


def _jit(facts: dict[str, Any], probed: bool) -> Finding:
    if not probed:
        return Finding(
            "jit cache",
            Status.SKIP,
            "no C compiler here to build the probe library",
            "install one (Debian: `apt-get install gcc`) and run doctor again",
        )
    loaded, tmp = facts.get(JIT_MOUNT), facts.get("/tmp")
    if loaded == 42 and tmp != 42:
        return Finding(
            "jit cache",
            Status.OK,
            f"a compiled library loads from {JIT_MOUNT}; from /tmp it is refused ({tmp})",
        )
    return Finding(
        "jit cache",
        Status.FAIL,
        f"{JIT_MOUNT}: {loaded}; /tmp: {tmp}",
        f"compiled kernels must load from {JIT_MOUNT} and not from /tmp: check that the "
        "daemon honours tmpfs mount options",
    )


def _memory(settings: Settings, chosen: Sequence[Gpu]) -> list[Finding]:
    share = settings.runtime_gpu_memory_utilization
    findings = []
    for gpu in chosen:
        needed = int(gpu.memory_total * share)
        free_gib, need_gib = gpu.memory_free / (1 << 30), needed / (1 << 30)
        if gpu.memory_free >= needed:
            findings.append(
                Finding(f"gpu {gpu.index} memory", Status.OK, f"{free_gib:.1f} GiB free")
            )
            continue
        findings.append(
            Finding(
                f"gpu {gpu.index} memory",
                Status.FAIL,
                f"{free_gib:.1f} GiB free, vLLM will claim {need_gib:.1f} GiB "
                f"(RESULTITY_RUNTIME_GPU_MEMORY_UTILIZATION={share})",
                "stop what else uses this GPU (`nvidia-smi` lists it), choose another GPU, "
                "or lower RESULTITY_RUNTIME_GPU_MEMORY_UTILIZATION",
            )
        )
    return findings


def _kernel() -> bytes | None:
    """A tiny shared library built here (any libc: it uses none), or None without `cc`."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as work:
        source, target = Path(work) / "kernel.c", Path(work) / "kernel.so"
        source.write_text(KERNEL_SOURCE)
        try:
            subprocess.run(
                [compiler, "-shared", "-fPIC", "-nostdlib", "-o", str(target), str(source)],
                check=True,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("doctor_kernel_build_failed error=%r", exc)
            return None
        return target.read_bytes()
