"""Parsing the runtime's `ready` frame into `RuntimeFacts`, without a runtime."""

from pathlib import Path
from typing import Any

import pytest

from schemas import frames
from tests.support.settings import MODEL_SHA
from worker.core.errors import RuntimeStartError
from worker.runtime.api import LaunchSpec, RuntimeFacts
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
