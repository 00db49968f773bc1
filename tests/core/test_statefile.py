"""`write_atomically`: whole or nothing, and never through a planted link."""

import os
from pathlib import Path

import pytest

from worker.core.statefile import write_atomically
from worker.node.snapshots import FLOOR_NAME, SAVED_NAME, Floor, save_snapshot, write_floor


def test_a_file_is_replaced_whole_with_owner_only_mode(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")
    assert write_atomically(target, b"new") == target
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


@pytest.mark.parametrize("write", ["snapshot", "floor"])
def test_the_node_state_never_writes_through_a_planted_link(tmp_path: Path, write: str) -> None:
    """A link planted where the state file or its temp file goes is replaced, never followed:
    the file it points at keeps its bytes (before, the floor's fixed temp name was opened
    with O_TRUNC and followed)."""
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    name = SAVED_NAME if write == "snapshot" else FLOOR_NAME
    for planted in (name, f".{name}.{os.getpid()}.tmp"):
        (state / planted).symlink_to(victim)
    if write == "snapshot":
        path = save_snapshot(state, b"envelope")
    else:
        path = write_floor(state, Floor(3, "a" * 64))
    assert victim.read_bytes() == b"precious"
    assert not path.is_symlink()
