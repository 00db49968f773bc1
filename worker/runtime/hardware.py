"""The node's hardware as the network sees it: the GPUs the runtime gets and the execution
class they make (PROTOCOL.md, "Execution classes").

`GpuInventory` is the seam: `NvidiaSmi` asks the NVIDIA driver (through `nvidia-smi`, which
the driver installs; no Python binding needed), tests pass a double. `execution_class` is
pure: the same hardware always gives the same class.
"""

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from schemas.snapshot import Snapshot
from worker.core.settings import Settings

log = logging.getLogger(__name__)

CPU_CLASS = "cpu-fp32"
"""A runtime without GPUs computes in float32 (the CPU engine's defaults)."""

ARCHITECTURES = (
    # (lowest compute capability, architecture), highest first
    ((12, 0), "blackwell"),
    ((10, 0), "blackwell"),
    ((9, 0), "hopper"),
    ((8, 9), "ada"),
    ((8, 0), "ampere"),
    ((7, 5), "turing"),
    ((7, 0), "volta"),
)
GPU_DTYPE = "bf16"
"""What vLLM computes in on a GPU with the model's default dtype (the demo model's and most
current models' `torch_dtype`); a class names the numbers its vectors were made with."""
QUERY = "index,uuid,name,memory.total,memory.free,compute_cap,driver_version"


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU as the driver reports it."""

    index: int
    uuid: str
    name: str
    memory_total: int
    """bytes"""
    memory_free: int
    """bytes"""
    compute_capability: tuple[int, int]
    driver_version: str = ""


class GpuInventory(Protocol):
    def gpus(self) -> list[Gpu] | None:
        """Every GPU of the machine; None when there is no NVIDIA driver. Blocking."""
        ...


class NvidiaSmi:
    """The driver's own view, through `nvidia-smi --query-gpu`."""

    def __init__(self, command: str = "nvidia-smi", timeout_s: float = 20.0) -> None:
        self._command = command
        self._timeout_s = timeout_s

    def gpus(self) -> list[Gpu] | None:
        path = shutil.which(self._command)
        if path is None:
            return None
        try:
            out = subprocess.run(
                [path, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=True,
                timeout=self._timeout_s,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("gpu_inventory_failed command=%s error=%r", path, exc)
            return None
        return parse_query(out)


def parse_query(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output, one GPU a line
    (memory in MiB; a field the driver cannot tell is `[N/A]`)."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(QUERY.split(",")):
            continue
        index, uuid, name, total, free, cap, driver = fields
        major, _, minor = cap.partition(".")
        gpus.append(
            Gpu(
                index=int(index),
                uuid=uuid,
                name=name,
                memory_total=_mib(total),
                memory_free=_mib(free),
                compute_capability=((int(major), int(minor or 0)) if major.isdigit() else (0, 0)),
                driver_version=driver,
            )
        )
    return gpus


def _mib(field: str) -> int:
    return int(field) << 20 if field.isdigit() else 0


def chosen_gpus(settings: Settings, gpus: Sequence[Gpu] | None) -> list[Gpu]:
    """The GPUs `RESULTITY_GPUS` gives the runtime, out of `gpus`; a chosen GPU the driver
    does not list is simply absent (the caller compares counts)."""
    wanted = settings.gpu_ids()
    if wanted is None or not gpus:
        return []
    if not wanted:
        return list(gpus)
    return [g for g in gpus if str(g.index) in wanted or g.uuid in wanted]


def architecture(gpu: Gpu) -> str:
    for lowest, name in ARCHITECTURES:
        if gpu.compute_capability >= lowest:
            return name
    return "unknown"


def execution_class(gpus: Sequence[Gpu]) -> str:
    """The class of a runtime on `gpus` (none: CPU): `cpu-fp32`, or `nvidia-<architecture>-
    bf16` when every GPU is of one architecture; GPUs of several make `nvidia-mixed-bf16`,
    which no snapshot should list (their results would not agree with each other)."""
    if not gpus:
        return CPU_CLASS
    kinds = {architecture(g) for g in gpus}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return f"nvidia-{kind}-{GPU_DTYPE}"


def node_execution_class(settings: Settings, inventory: GpuInventory | None = None) -> str:
    """This node's class: from the GPUs `RESULTITY_GPUS` chooses, as the driver reports
    them. Blocking (asks the driver when GPUs are configured)."""
    if settings.gpu_ids() is None:
        return CPU_CLASS
    gpus = chosen_gpus(settings, (inventory or NvidiaSmi()).gpus())
    if not gpus:
        return f"nvidia-unknown-{GPU_DTYPE}"  # configured for GPUs the driver does not show
    return execution_class(gpus)


def no_class_reason(snapshot: Snapshot, name: str) -> str:
    """Why a node of class `name` serves nothing under `snapshot`: for its signed error."""
    listed = ", ".join(sorted(snapshot.classes or {})) or "none"
    return (
        f"snapshot {snapshot.version} has no runtime for this node's execution class "
        f"{name!r} (it lists: {listed}); this node serves nothing until one does"
    )
