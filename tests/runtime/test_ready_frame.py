"""Parsing the runtime's `ready` frame into `RuntimeFacts`, without a runtime."""

from pathlib import Path
from typing import Any

import pytest

from schemas import frames
from tests.support.settings import MODEL_SHA
from worker.core.errors import RuntimeStartError
from worker.runtime.api import Device, LaunchSpec, RuntimeFacts
from worker.runtime.supervisor import check_ready

SPEC = LaunchSpec("echo", "sha256:" + "1" * 64, Path("/model"), MODEL_SHA, {})


def parse(frame: dict[str, Any], spec: LaunchSpec = SPEC) -> RuntimeFacts:
    return check_ready(frame, spec)


def ready(**over: Any) -> dict[str, Any]:
    frame = frames.ready(
        engine="echo", engine_version="1.0", model_sha256=MODEL_SHA, device="cpu", max_active=8
    )
    return {**frame, **over}


def test_ready_gives_the_facts_and_the_image() -> None:
    assert parse(ready()) == RuntimeFacts("echo", "1.0", MODEL_SHA, "cpu", SPEC.image, 8)


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (ready(proto=99), "frame protocol 99"),
        (ready(proto=None), "frame protocol None"),
        (ready(engine=3), "ready.engine must be a string"),
        (ready(device=None), "ready.device must be a string"),
        ({"t": "ready", "proto": frames.PROTOCOL_VERSION}, "must be a string"),
        (ready(model_sha256="ab" * 32), "expected " + MODEL_SHA),
    ],
    ids=["other_proto", "no_proto", "engine_type", "no_device", "bare", "other_model"],
)
def test_a_bad_ready_is_a_start_error_that_says_what_is_wrong(
    frame: dict[str, Any], says: str
) -> None:
    with pytest.raises(RuntimeStartError, match=says.replace("(", r"\(")):
        parse(frame)


def test_any_model_is_accepted_when_the_spec_names_none() -> None:
    spec = LaunchSpec("echo", "local", Path("/model"), "", {})
    assert parse(ready(model_sha256="ab" * 32), spec).model_sha256 == "ab" * 32


H200 = {"name": "NVIDIA H200", "uuid": "GPU-0f1e2d3c-aaaa", "memory_bytes": 150 << 30}


def test_every_device_the_runtime_sees_reaches_the_facts() -> None:
    second = {**H200, "uuid": "GPU-0f1e2d3c-bbbb"}
    facts = parse(ready(device="NVIDIA H200", devices=[H200, second]))
    assert facts.devices == (
        Device("NVIDIA H200", "GPU-0f1e2d3c-aaaa", 150 << 30),
        Device("NVIDIA H200", "GPU-0f1e2d3c-bbbb", 150 << 30),
    )


def test_a_ready_without_devices_is_a_cpu_runtime() -> None:
    frame = ready()
    del frame["devices"]
    assert parse(frame).devices == ()


@pytest.mark.parametrize(
    "devices",
    [
        [H200] * (frames.MAX_DEVICES + 1),
        "NVIDIA H200",
        [{**H200, "memory_bytes": -1}],
        [{**H200, "name": ""}],
        [{**H200, "uuid": "x" * 200}],
        [["NVIDIA H200"]],
    ],
    ids=["too_many", "not_a_list", "negative_memory", "no_name", "long_uuid", "not_a_map"],
)
def test_bad_devices_are_a_start_error(devices: Any) -> None:
    with pytest.raises(RuntimeStartError, match="ready.devices"):
        parse(ready(devices=devices))
