"""What the node runs on: CPU, memory, the cache's disk and every NVIDIA GPU.

What does not change (CPU model and cores, memory and disk totals, each GPU's index, UUID,
name, memory total, driver and CUDA versions) is read once, when the monitor opens; what
moves is sampled by a thread of its own every `interval_s`, so neither NVML nor `/proc` is
ever read on the event loop. `HardwareMonitor.latest()` hands out the last sample.

GPUs are read through NVML's NVIDIA-maintained binding (`nvidia-ml-py`, imported as
`pynvml`; the `gpu` extra). Without it, without a driver, or without a GPU the list is empty:
a CPU node is not an error. A figure a device does not support (ECC on consumer cards, power
on some boards) is None. `GpuProbe` takes the binding as an argument: tests pass a double.
"""

import asyncio
import importlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from schemas.node import Cpu, Disk, Gpu, Hardware, Memory
from worker.core.resource import AsyncResource

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML's constants (nvml.h, stable across driver versions).
NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
CLOCK_EVENT_REASONS = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
"""NVML's clock event ("throttle") reason bits worth a flag; idle (0x1) and the
applications clocks setting (0x2) are normal operation and left out."""


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """What does not change about one GPU."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    driver_version: str
    cuda_version: str | None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuProbe:
    """NVML, opened once (`open`), read per GPU; closed with `close`."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles: list[Any] = []

    @classmethod
    def open(cls, nvml: Any = None) -> "GpuProbe | None":
        """NVML initialised, or None (and why, logged) when this machine has no NVIDIA GPU
        to read: no binding installed, no driver, no device."""
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                log.info("gpu_inventory_off reason=no_binding (install the 'gpu' extra)")
                return None
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError: no driver, no library
            log.info("gpu_inventory_off reason=%r", exc)
            return None
        return cls(nvml)

    def facts(self) -> list[GpuFacts]:
        nvml = self._nvml
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = self._optional(nvml.nvmlSystemGetCudaDriverVersion)
        cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
        found = []
        self._handles = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles.append(handle)
            found.append(
                GpuFacts(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    driver_version=driver,
                    cuda_version=cuda_version,
                )
            )
        return found

    def sample(self, facts: GpuFacts) -> Gpu:
        """One GPU's figures now; each that NVML refuses on this device is None."""
        nvml, handle = self._nvml, self._handles[facts.index]
        opt = self._optional
        memory = opt(nvml.nvmlDeviceGetMemoryInfo, handle)
        utilization = opt(nvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = opt(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = opt(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        reasons = opt(self._clock_event_reasons, handle)
        return Gpu(
            index=facts.index,
            uuid=facts.uuid,
            name=facts.name,
            memory_total_bytes=facts.memory_total_bytes,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            driver_version=facts.driver_version,
            cuda_version=facts.cuda_version,
            temperature_celsius=opt(nvml.nvmlDeviceGetTemperature, handle, NVML_TEMPERATURE_GPU),
            utilization_ratio=int(utilization.gpu) / 100 if utilization is not None else None,
            power_watts=power_mw / 1000 if power_mw is not None else None,
            power_limit_watts=limit_mw / 1000 if limit_mw is not None else None,
            ecc_errors_corrected=self._ecc(handle, NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ecc_errors_uncorrected=self._ecc(handle, NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            throttle_reasons=[
                flag for bit, flag in CLOCK_EVENT_REASONS.items() if reasons and reasons & bit
            ],
        )

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvml_shutdown_failed error=%r", exc)

    def _clock_event_reasons(self, handle: Any) -> int:
        # Renamed in newer drivers' bindings; the older name stays as an alias in some.
        nvml = self._nvml
        read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if read is None:
            read = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(read(handle))

    def _ecc(self, handle: Any, error_type: int) -> int | None:
        count = self._optional(
            self._nvml.nvmlDeviceGetTotalEccErrors, handle, error_type, NVML_VOLATILE_ECC
        )
        return int(count) if count is not None else None

    @staticmethod
    def _optional(read: Callable[..., T], *args: Any) -> T | None:
        """`read(*args)`, or None when NVML says the device cannot (NVMLError_NotSupported
        and its kin: the binding raises one class per return code)."""
        try:
            return read(*args)
        except Exception:
            return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()[:256]
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "unknown")[:256]


def memory() -> Memory:
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" not in fields:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        fields = {"MemTotal": pages, "MemAvailable": pages}
    return Memory(
        total_bytes=fields["MemTotal"],
        available_bytes=fields.get("MemAvailable", fields["MemTotal"]),
    )


def disk(path: Path) -> Disk:
    """The file system holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return Disk(total_bytes=usage.total, free_bytes=usage.free)


class HardwareMonitor(AsyncResource):
    """The node's hardware: facts read once at open, figures sampled every `interval_s` by
    its own thread; `latest()` is the last sample (see the module docstring)."""

    def __init__(self, cache_dir: Path, interval_s: float, *, nvml: Any = None) -> None:
        super().__init__()
        self._cache_dir = cache_dir
        self._interval_s = interval_s
        self._nvml = nvml
        self._probe: GpuProbe | None = None
        self._gpus: list[GpuFacts] = []
        self._cpu = Cpu(model="unknown", cores=1)
        self._latest: Hardware | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def latest(self) -> Hardware:
        assert self._latest is not None, "HardwareMonitor is not open"
        return self._latest

    async def _open(self, stack: AsyncExitStack) -> None:
        await asyncio.to_thread(self._read_facts)
        self._thread = threading.Thread(target=self._run, name="hardware", daemon=True)
        self._thread.start()

    async def _close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._probe is not None:
            await asyncio.to_thread(self._probe.close)

    def _read_facts(self) -> None:
        self._cpu = Cpu(model=cpu_model(), cores=os.cpu_count() or 1)
        self._probe = GpuProbe.open(self._nvml)
        if self._probe is not None:
            try:
                self._gpus = self._probe.facts()
            except Exception as exc:
                log.warning("gpu_inventory_failed error=%r", exc)
                self._gpus = []
        log.info(
            "hardware cpu=%r cores=%d gpus=%s",
            self._cpu.model,
            self._cpu.cores,
            [f"{g.index}:{g.name}" for g in self._gpus],
        )
        self._latest = self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._latest = self._sample()
            except Exception:
                log.exception("hardware_sample_failed")

    def _sample(self) -> Hardware:
        gpus = []
        if self._probe is not None:
            for facts in self._gpus:
                try:
                    gpus.append(self._probe.sample(facts))
                except Exception as exc:  # a GPU fallen off the bus says so in the log
                    log.warning("gpu_sample_failed index=%d error=%r", facts.index, exc)
        return Hardware(
            cpu=self._cpu,
            memory=memory(),
            disk=disk(self._cache_dir),
            gpus=gpus,
            sampled_at=round(time.time(), 3),
        )
