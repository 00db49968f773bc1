"""Runtime images: the echo image builds on a base made here, is cached by its build key,
and runs the runtime process exactly as the host does."""

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from schemas import frames
from worker.cli.main import main
from worker.devtools import images

pytestmark = pytest.mark.docker


def test_build_key_covers_base_and_recipe(tmp_path: Path) -> None:
    recipe = images.recipes()["echo"]
    one = images.build_key(recipe, "sha256:aa", tmp_path)
    assert one == images.build_key(recipe, "sha256:aa", tmp_path)
    assert one != images.build_key(recipe, "sha256:bb", tmp_path)
    (tmp_path / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    assert one != images.build_key(recipe, "sha256:aa", tmp_path)
    other = images.recipes()["vllm-cpu"]
    assert one != images.build_key(other, "sha256:aa", tmp_path)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(images.ImageBuildError, match="unknown engine"):
        images.ensure_image("nope")


def test_echo_image_is_built_once_then_cached(
    docker_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_id = images.ensure_image("echo", client=docker_client)
    assert image_id.startswith("sha256:")

    def no_rebuild(**kwargs: Any) -> None:
        raise AssertionError("ensure_image rebuilt an unchanged image")

    monkeypatch.setattr(docker_client.api, "build", no_rebuild)
    assert images.ensure_image("echo", client=docker_client) == image_id

    config = docker_client.images.get(image_id).attrs["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["python3", "-m", "containers.runtime"]
    assert images.BUILD_KEY_LABEL in config["Labels"]


def test_a_change_of_the_runtime_code_rebuilds_the_runtime_layer_alone(
    docker_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The engine's dependencies are an image of their own, keyed without the runtime
    sources: an edit to the runtime builds a thin layer on it (for vLLM, seconds instead of
    re-hashing a 2.4 GB venv)."""
    images.ensure_image("echo", client=docker_client)
    marker = tmp_path / "marker.py"
    marker.write_text(f"# {uuid.uuid4().hex}\n")  # a change no earlier run has built
    sources = images._runtime_sources()
    changed = [*sources, ("containers/runtime/zz_marker.py", marker)]
    monkeypatch.setattr(images, "_runtime_sources", lambda: changed)
    built: list[tuple[str, bool]] = []
    build = docker_client.api.build

    def recorded(**kwargs: Any) -> Any:
        wheels = (Path(kwargs["path"]) / "wheels").exists()
        built.append((kwargs["tag"].split(":")[0], wheels))
        return build(**kwargs)

    monkeypatch.setattr(docker_client.api, "build", recorded)
    image_id = images.ensure_image("echo", client=docker_client)
    try:
        assert built == [("resultity/runtime-echo", False)]  # no wheels: no dependencies
        listed = docker_client.containers.run(
            image_id, entrypoint=["ls", "/opt/resultity/containers/runtime"], remove=True
        )
        assert b"zz_marker.py" in listed
    finally:
        docker_client.images.remove(image_id, force=True)


async def test_ensure_image_async_returns_the_same_id(docker_client: Any) -> None:
    assert await images.ensure_image_async("echo", client=docker_client) == images.ensure_image(
        "echo", client=docker_client
    )


def test_cli_prints_engine_tab_image_id(
    docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["images", "build", "--engine", "echo"]) == 0
    out = capsys.readouterr().out
    engine, image_id = out.rstrip("\n").split("\t")
    assert engine == "echo"
    assert image_id == images.ensure_image("echo", client=docker_client)


def test_echo_image_answers_like_the_host(docker_client: Any, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x01\x02" * 1000)
    image_id = images.ensure_image("echo", client=docker_client)
    stream = b"".join(
        frames.pack(f)
        for f in (
            frames.submit(1, {"prompt": "hi", "params": {"seed": 5}}),
            frames.ping(2),
        )  # then end of input: the runtime answers what it got, and exits
    )
    hardened = ["--network", "none", "--read-only", "--cap-drop", "ALL"]
    hardened += ["--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]
    in_container = subprocess.run(
        ["docker", "run", "--rm", "-i", *hardened, "-v", f"{model}:/model:ro", image_id],
        input=stream,
        capture_output=True,
        timeout=120,
        check=True,
    )
    on_host = subprocess.run(
        [sys.executable, "-m", "containers.runtime"],
        input=stream,
        capture_output=True,
        timeout=60,
        check=True,
        cwd=images.REPO_ROOT,
        env={"RESULTITY_MODEL_DIR": str(model), "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    container_frames = _frames(in_container.stdout)
    assert sorted(f["t"] for f in container_frames) == ["done", "pong", "ready"]
    assert _comparable(container_frames) == _comparable(_frames(on_host.stdout))


def _comparable(found: list[frames.Frame]) -> list[frames.Frame]:
    """The frames by kind, without the one timing (`first_token_s`)."""
    return sorted(
        ({k: v for k, v in f.items() if k != "first_token_s"} for f in found),
        key=lambda f: str(f["t"]),
    )


def _frames(data: bytes) -> list[frames.Frame]:
    decoder = frames.FrameDecoder(frames.TO_AGENT)
    return decoder.feed(data)
