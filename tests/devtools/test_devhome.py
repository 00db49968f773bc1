"""How client commands find a dev network: its `client.json`, unless RESULTITY_* says
otherwise (pure; the terminal test in test_quickstart.py runs it for real)."""

import json
import stat
from pathlib import Path

import pytest

from worker.cli.main import main
from worker.core.settings import Settings
from worker.core.signing import load_key_file, write_key_file
from worker.devtools.devhome import (
    CLIENT_FILE,
    HOME_VARIABLE,
    client_settings,
    make_home,
    remove_client_file,
    write_client_file,
)
from worker.devtools.devnet import has_chat_template


@pytest.fixture
def dev_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("NATS_URL", "AUTHORITY_KEYS", "KEY_FILE", "SUBJECT_PREFIX"):
        monkeypatch.delenv(f"RESULTITY_{name}", raising=False)
    monkeypatch.setenv(HOME_VARIABLE, str(tmp_path))
    authority = write_key_file(tmp_path / "authority.key")
    settings = Settings(
        nats_url="nats://127.0.0.1:4999",
        authority_keys=(authority.node_id,),
        key_file=tmp_path / "node.key",
        subject_prefix="devnet",
    )
    write_client_file(tmp_path, settings, "ab" * 32)
    return tmp_path


def test_client_commands_use_the_running_dev_network(dev_home: Path) -> None:
    network = client_settings()
    assert network.settings.nats_url == "nats://127.0.0.1:4999"
    assert network.settings.subject_prefix == "devnet"
    assert len(network.settings.authority_keys) == 1
    assert network.node_id == "ab" * 32
    expected = f"network: dev at nats://127.0.0.1:4999 (from {dev_home / CLIENT_FILE})"
    assert network.describe() == expected


def test_a_variable_wins_over_the_dev_file(dev_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESULTITY_SUBJECT_PREFIX", "mine")
    assert client_settings().settings.subject_prefix == "mine"
    monkeypatch.setenv("RESULTITY_NATS_URL", "nats://10.0.0.5:4222")
    network = client_settings()
    assert network.settings.nats_url == "nats://10.0.0.5:4222"
    assert network.settings.authority_keys == ()  # another network: nothing from the dev file
    assert network.node_id is None
    assert network.describe() == "network: nats://10.0.0.5:4222 (RESULTITY_NATS_URL)"


def test_no_dev_network_says_so(dev_home: Path) -> None:
    remove_client_file(dev_home)
    network = client_settings()
    assert network.settings.nats_url == Settings().nats_url
    assert "no running dev network" in network.describe()


def test_verify_trusts_the_dev_networks_authority(
    dev_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_key_file(dev_home / "authority.key").sign("config", {"version": 1})
    (dev_home / "config.msgpack").write_bytes(config)
    assert main(["verify", str(dev_home / "config.msgpack")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["body"] == {"version": 1}
    assert err.startswith("network: dev at nats://127.0.0.1:4999")
    remove_client_file(dev_home)
    assert main(["verify", str(dev_home / "config.msgpack")]) == 2
    assert "not a trusted authority key" in capsys.readouterr().err


def test_a_chat_vector_only_for_a_model_that_ships_a_chat_template(tmp_path: Path) -> None:
    """`dev --model DIR` adds a chat validation vector only where the model can render one
    (a model without a template would fail its own vectors as BAD_REQUEST)."""
    assert has_chat_template(None)  # the demo model ships one
    assert not has_chat_template(tmp_path)  # no tokenizer_config.json
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"model_max_length": 256}))
    assert not has_chat_template(tmp_path)
    config.write_text("{not json")
    assert not has_chat_template(tmp_path)
    config.write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert has_chat_template(tmp_path)


def _settings(home: Path) -> Settings:
    return Settings(nats_url="nats://127.0.0.1:4999", key_file=home / "node.key")


def test_client_file_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Issue 20 item 8: the file was written through a fixed temp name that followed links."""
    home = tmp_path / "home"
    make_home(home)
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (home / "client.tmp").symlink_to(victim)  # the old temp name
    (home / CLIENT_FILE).symlink_to(victim)
    path = write_client_file(home, _settings(home), "ab" * 32)
    assert victim.read_text() == "mine\n"
    assert not path.is_symlink() and json.loads(path.read_text())["node_id"] == "ab" * 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["client.json", "client.tmp"]


def test_a_home_others_may_write_is_refused_saying_what_to_change(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for mode in (0o777, 0o770, 0o702):
        home.chmod(mode)
        with pytest.raises(PermissionError, match=r"writable by group or others .*chmod go-w"):
            make_home(home)
        with pytest.raises(PermissionError, match="writable by group or others"):
            write_client_file(home, _settings(home), "ab" * 32)
        assert not (home / CLIENT_FILE).exists()


def test_dev_refuses_a_world_writable_home_before_writing_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    assert main(["dev", "--home", str(home), "--once"]) == 2
    assert f"chmod go-w {home}" in capsys.readouterr().err
    assert list(home.iterdir()) == []
