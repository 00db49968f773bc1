"""The node's execution class from its hardware (pure, on a double of the driver's
inventory), and what a snapshot with classes means for a node of a class."""

from typing import Any

import pytest

from schemas.snapshot import Snapshot
from worker.core.settings import Settings
from worker.runtime.hardware import (
    CPU_CLASS,
    Gpu,
    architecture,
    chosen_gpus,
    execution_class,
    no_class_reason,
    node_execution_class,
    parse_query,
)

SMI = """\
0, GPU-11111111-aaaa, NVIDIA H200, 143771, 143000, 9.0, 570.86
1, GPU-22222222-bbbb, NVIDIA H200, 143771, 1024, 9.0, 570.86
2, GPU-33333333-cccc, NVIDIA A100-SXM4-80GB, 81920, 81000, 8.0, 570.86
"""


class Inventory:
    """The seam's double: the GPUs a driver would list (None: no driver)."""

    def __init__(self, gpus: list[Gpu] | None) -> None:
        self._gpus = gpus
        self.asked = 0

    def gpus(self) -> list[Gpu] | None:
        self.asked += 1
        return self._gpus


def gpu(cap: tuple[int, int], index: int = 0) -> Gpu:
    return Gpu(index, f"GPU-{index:08d}-x", "g", 1 << 30, 1 << 30, cap)


def test_nvidia_smi_output_is_read() -> None:
    gpus = parse_query(SMI + "garbage line\n")
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[0] == Gpu(
        0, "GPU-11111111-aaaa", "NVIDIA H200", 143771 << 20, 143000 << 20, (9, 0), "570.86"
    )
    assert parse_query("0, GPU-x, T4, [N/A], [N/A], [N/A], 1\n")[0].memory_total == 0


@pytest.mark.parametrize(
    ("cap", "arch"),
    [
        ((7, 0), "volta"),
        ((7, 5), "turing"),
        ((8, 0), "ampere"),
        ((8, 6), "ampere"),
        ((8, 9), "ada"),
        ((9, 0), "hopper"),
        ((10, 0), "blackwell"),
        ((12, 0), "blackwell"),
        ((6, 1), "unknown"),
    ],
)
def test_architecture_by_compute_capability(cap: tuple[int, int], arch: str) -> None:
    assert architecture(gpu(cap)) == arch


def test_the_class_follows_the_hardware() -> None:
    assert execution_class([]) == CPU_CLASS == "cpu-fp32"
    assert execution_class([gpu((9, 0))]) == "nvidia-hopper-bf16"
    assert execution_class([gpu((9, 0), 0), gpu((9, 0), 1)]) == "nvidia-hopper-bf16"
    assert execution_class([gpu((9, 0), 0), gpu((8, 0), 1)]) == "nvidia-mixed-bf16"


@pytest.mark.parametrize(
    ("gpus", "chosen"),
    [("", []), ("all", [0, 1, 2]), ("1", [1]), ("GPU-33333333-cccc,0", [0, 2]), ("7", [])],
)
def test_the_chosen_gpus(gpus: str, chosen: list[int]) -> None:
    assert [g.index for g in chosen_gpus(Settings(gpus=gpus), parse_query(SMI))] == chosen


def test_a_node_without_gpus_is_cpu_whatever_the_machine_has() -> None:
    inventory = Inventory(parse_query(SMI))
    assert node_execution_class(Settings(), inventory) == CPU_CLASS
    assert inventory.asked == 0


@pytest.mark.parametrize(
    ("gpus", "found", "cls"),
    [
        ("0,1", SMI, "nvidia-hopper-bf16"),
        ("2", SMI, "nvidia-ampere-bf16"),
        ("all", SMI, "nvidia-mixed-bf16"),
        ("all", None, "nvidia-unknown-bf16"),  # no driver: a class no snapshot lists
        ("5", SMI, "nvidia-unknown-bf16"),
    ],
)
def test_a_gpu_node_asks_the_driver(gpus: str, found: str | None, cls: str) -> None:
    inventory = Inventory(parse_query(found) if found else None)
    assert node_execution_class(Settings(gpus=gpus), inventory) == cls


RUNTIME = {"name": "r", "image": "sha256:" + "1" * 64, "engine": "echo", "engine_args": {}}
VECTOR = {"prompt": "p", "params": {"max_tokens": 2}, "expected_sha256": "a" * 64}


def snapshot(**extra: Any) -> Snapshot:
    model = {
        "id": "m",
        "version": "1",
        "sha256": "c" * 64,
        "size": 1,
        "source": "https://example.invalid/m",
        "validation": [VECTOR],
    }
    body = {
        "network": "devnet",
        "version": 1,
        "issued_at": 0,
        "runtime": RUNTIME,
        "models": [model, model | {"id": "n"}],
    }
    return Snapshot.model_validate(body | extra)


def test_a_snapshot_without_classes_is_the_same_for_every_class() -> None:
    plain = snapshot()
    assert plain.for_class(CPU_CLASS) is plain
    assert plain.for_class("nvidia-hopper-bf16") is plain


def test_a_class_entry_replaces_the_runtime_and_the_vectors_it_names() -> None:
    hopper_runtime = RUNTIME | {"image": "sha256:" + "2" * 64}
    hopper_vector = VECTOR | {"expected_sha256": "b" * 64}
    classed = snapshot(
        classes={
            CPU_CLASS: {"runtime": RUNTIME},
            "nvidia-hopper-bf16": {
                "runtime": hopper_runtime,
                "validation": {"m": [hopper_vector]},
            },
        }
    )
    hopper = classed.for_class("nvidia-hopper-bf16")
    assert hopper is not None and hopper.classes is None
    assert hopper.runtime.image == hopper_runtime["image"]
    assert [v.expected_sha256 for v in hopper.models[0].validation] == ["b" * 64]
    assert [v.expected_sha256 for v in hopper.models[1].validation] == ["a" * 64]
    assert hopper.version == classed.version
    cpu = classed.for_class(CPU_CLASS)
    assert cpu is not None and cpu.runtime == classed.runtime
    assert classed.for_class("nvidia-ampere-bf16") is None
    reason = no_class_reason(classed, "nvidia-ampere-bf16")
    assert "'nvidia-ampere-bf16'" in reason and "cpu-fp32, nvidia-hopper-bf16" in reason


@pytest.mark.parametrize(
    ("classes", "says"),
    [
        ({"Bad Name": {"runtime": RUNTIME}}, "pattern"),
        ({CPU_CLASS: {"runtime": RUNTIME, "validation": {"zz": [VECTOR]}}}, "unlisted"),
        ({CPU_CLASS: {"runtime": RUNTIME | {"image": "latest"}}}, "pinned"),
        ({f"c{i}": {"runtime": RUNTIME} for i in range(17)}, "at most 16"),
    ],
)
def test_bad_classes_are_refused(classes: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        snapshot(classes=classes)
