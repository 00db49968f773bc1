"""`resultity-node keygen`, `verify` and the help of every subcommand, run as a user would."""

import argparse
import json
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from worker.cli.main import build_parser
from worker.core.signing import NodeKey, load_key_file


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *args],
        input=stdin.decode("latin-1"),
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=60,
        check=False,
    )
    return result


def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public way to list subparsers.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_paths(
    parser: argparse.ArgumentParser | None = None, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every subcommand and sub-subcommand, by its words (`("config", "sign")`)."""
    found = {}
    for name, child in children(parser or build_parser()).items():
        found[(*prefix, name)] = child
        found |= command_paths(child, (*prefix, name))
    return found


COMMANDS = command_paths()


def test_keygen_writes_a_private_key_file_and_prints_the_node_id(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "node.key"
    result = cli("keygen", "--out", str(out))
    assert result.returncode == 0, result.stderr
    node_id = result.stdout.strip()
    assert len(node_id) == 64
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert load_key_file(out).node_id == node_id
    assert out.read_text().strip() not in result.stdout + result.stderr


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "node.key"
    assert cli("keygen", "--out", str(out)).returncode == 0
    before = out.read_bytes()
    result = cli("keygen", "--out", str(out))
    assert result.returncode != 0
    assert "already exists" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_keygen_requires_out() -> None:
    result = cli("keygen")
    assert result.returncode == 2
    assert "--out" in result.stderr


@pytest.fixture
def envelope(tmp_path: Path) -> tuple[NodeKey, bytes, Path]:
    key = NodeKey.from_seed(bytes(32))
    data = key.sign("result", {"node_id": key.node_id, "job_id": "job-1", "raw": b"\x01\x02"})
    path = tmp_path / "result.msgpack"
    path.write_bytes(data)
    return key, data, path


def test_verify_from_a_file(envelope: tuple[NodeKey, bytes, Path]) -> None:
    key, _, path = envelope
    result = cli("verify", str(path))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["typ"] == "result"
    assert shown["signer"] == key.node_id
    assert shown["body"]["job_id"] == "job-1"
    assert shown["body"]["raw"] == {"hex": "0102"}


def test_verify_from_stdin(envelope: tuple[NodeKey, bytes, Path]) -> None:
    key, data, _ = envelope
    for args in (("verify",), ("verify", "-")):
        result = cli(*args, stdin=data)
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        assert shown["signer"] == key.node_id
        assert shown["body"]["node_id"] == key.node_id


def test_verify_config_with_authority(tmp_path: Path) -> None:
    authority = NodeKey.generate()
    path = tmp_path / "config.msgpack"
    path.write_bytes(authority.sign("config", {"version": 1}))
    result = cli("verify", str(path), "--authority", authority.node_id)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["body"] == {"version": 1}
    untrusted = cli("verify", str(path))
    assert untrusted.returncode != 0
    assert "not a trusted authority key" in untrusted.stderr


def one_line_failure(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("resultity-node verify: ")
    assert fragment in lines[0]


def test_verify_failures_exit_non_zero_with_one_line(
    envelope: tuple[NodeKey, bytes, Path], tmp_path: Path
) -> None:
    key, data, _ = envelope
    env = msgpack.unpackb(data, raw=False)
    env["body"] = env["body"][:-1] + b"\x03"
    tampered = msgpack.packb(env, use_bin_type=True)
    one_line_failure(cli("verify", stdin=tampered), "signature does not verify")
    one_line_failure(cli("verify", stdin=b"not msgpack"), "not a valid envelope")
    one_line_failure(cli("verify", stdin=b""), "not a valid envelope")
    one_line_failure(cli("verify", str(tmp_path / "missing.msgpack")), "No such file")
    one_line_failure(cli("verify", stdin=data[:-1]), "not a valid envelope")
    other = NodeKey.generate().sign("event", {"node_id": key.node_id})
    one_line_failure(cli("verify", stdin=other), "node_id")
    one_line_failure(cli("verify", "--authority", "xyz", stdin=data), "Ed25519 public key")


def test_the_walk_finds_subcommands_and_their_subcommands() -> None:
    assert {("keygen",), ("verify",), ("run",), ("config",), ("config", "sign")} <= set(COMMANDS)
    assert {path for path in COMMANDS if len(path) == 2} >= {("stack", "seed"), ("images", "build")}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_help_has_an_example(path: tuple[str, ...]) -> None:
    help_text = COMMANDS[path].format_help()
    command = " ".join(path)
    assert "example" in help_text.lower(), f"'resultity-node {command} --help' shows no example"
    assert "resultity-node" in help_text.lower().split("example", 1)[1]


def test_top_level_help_runs() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "example" in result.stdout
    assert "keygen" in result.stdout and "verify" in result.stdout


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_of_every_command_as_a_process(path: tuple[str, ...]) -> None:
    result = cli(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: resultity-node {' '.join(path)} ")
    assert "example" in result.stdout.lower()


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        ["resultity-node", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
