"""The hardware inventory (`worker.node.inventory`): facts read once, figures sampled by a
thread, NVML read through a double of the binding (no test needs a GPU)."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.support.polling import wait_for
from worker.node.inventory import HardwareMonitor


class NotSupported(Exception):
    """What the binding raises for a figure a device does not have (NVMLError_NotSupported)."""


class FakeNvml:
    """The calls `GpuProbe` makes on `pynvml`, over two GPUs: a data-centre card with every
    figure, and a consumer card without ECC or power readings."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.used = [10 << 30, 1 << 30]
        self.reasons = [0x1 | 0x20 | 0x8, 0x1]  # idle + thermal + hw slowdown; idle only
        self.initialised = False

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml"):
            object.__getattribute__(self, "calls")[name] += 1
        return object.__getattribute__(self, name)

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:08d}-aaaa"

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return "NVIDIA H200" if h == 0 else b"NVIDIA GeForce RTX 4090"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        total = (141 << 30) if h == 0 else (24 << 30)
        return SimpleNamespace(total=total, used=self.used[h], free=total - self.used[h])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=87 if h == 0 else 0, memory=40)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise NotSupported()
        return 412_500

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        if h == 1:
            raise NotSupported()
        return 700_000

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == 0
        return 64 if h == 0 else 35

    def nvmlDeviceGetTotalEccErrors(self, h: int, error_type: int, counter: int) -> int:
        if h == 1:
            raise NotSupported()
        return 3 if error_type == 0 else 1

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return self.reasons[h]


async def test_every_gpu_with_its_facts_and_figures(tmp_path: Path) -> None:
    nvml = FakeNvml()
    async with HardwareMonitor(tmp_path, 3600, nvml=nvml) as monitor:
        hardware = monitor.latest()
    big, small = hardware.gpus
    assert (big.index, big.uuid, big.name) == (0, "GPU-00000000-aaaa", "NVIDIA H200")
    assert big.memory_total_bytes == 141 << 30 and big.memory_used_bytes == 10 << 30
    assert big.driver_version == "550.54.15" and big.cuda_version == "12.4"
    assert big.temperature_celsius == 64 and big.utilization_ratio == 0.87
    assert big.power_watts == 412.5 and big.power_limit_watts == 700.0
    assert (big.ecc_errors_corrected, big.ecc_errors_uncorrected) == (3, 1)
    assert big.throttle_reasons == ["hw_slowdown", "sw_thermal_slowdown"], "idle is no flag"
    assert small.name == "NVIDIA GeForce RTX 4090", "bytes from older bindings decoded"
    assert small.power_watts is None and small.ecc_errors_uncorrected is None
    assert small.throttle_reasons == []
    assert not nvml.initialised, "closing the monitor shuts NVML down"


async def test_facts_are_read_once_and_figures_sampled_by_the_thread(tmp_path: Path) -> None:
    nvml = FakeNvml()
    async with HardwareMonitor(tmp_path, 0.01, nvml=nvml) as monitor:
        assert monitor.latest().gpus[0].memory_used_bytes == 10 << 30
        nvml.used[0] = 100 << 30
        nvml.reasons[0] = 0x4
        await wait_for(lambda: monitor.latest().gpus[0].memory_used_bytes == 100 << 30)
        await wait_for(lambda: nvml.calls["nvmlDeviceGetTemperature"] > 10)
        assert monitor.latest().gpus[0].throttle_reasons == ["sw_power_cap"]
    assert nvml.calls["nvmlDeviceGetName"] == 2 and nvml.calls["nvmlDeviceGetUUID"] == 2
    assert nvml.calls["nvmlInit"] == 1 and nvml.calls["nvmlSystemGetDriverVersion"] == 1


async def test_no_driver_means_no_gpus_not_an_error(tmp_path: Path) -> None:
    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    async with HardwareMonitor(tmp_path / "not" / "yet", 3600, nvml=NoDriver()) as monitor:
        hardware = monitor.latest()
    assert hardware.gpus == []
    assert hardware.cpu.cores >= 1 and hardware.memory.total_bytes > 0
    assert hardware.disk.total_bytes > 0, "a cache dir not made yet: its nearest parent's disk"


async def test_this_machine_without_a_gpu_has_an_empty_list(tmp_path: Path) -> None:
    async with HardwareMonitor(tmp_path, 3600) as monitor:
        assert monitor.latest().gpus == []
