"""A node's connection settings: plaintext refused unless told, credentials files 0600."""

import ssl
from pathlib import Path

import pytest

from tests.support.settings import make_settings
from worker.core.credentials import connect_options, new_user_seed, require_tls, user_public_key
from worker.core.errors import KeyFileError, NodeError
from worker.devtools.localca import ensure_local_ca


def test_a_node_refuses_a_plaintext_url_unless_told() -> None:
    with pytest.raises(NodeError, match="RESULTITY_NATS_INSECURE"):
        require_tls(make_settings(nats_url="tls://a:4222,nats://b:4222", nats_insecure=False))
    require_tls(make_settings(nats_url="tls://a:4222", nats_insecure=False))
    require_tls(make_settings(nats_url="nats://127.0.0.1:4222", nats_insecure=True))


def test_an_nkey_seed_file_is_0600_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "node.nk"
    public = new_user_seed(path)
    assert public.startswith("U") and user_public_key(path) == public
    assert path.stat().st_mode & 0o777 == 0o600
    options = connect_options(make_settings(nats_nkey_seed_file=path))
    assert options == {"nkeys_seed": str(path)}
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        connect_options(make_settings(nats_nkey_seed_file=path))


def test_a_creds_file_and_a_ca_become_nats_py_options(tmp_path: Path) -> None:
    creds = tmp_path / "node.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    ca = ensure_local_ca(tmp_path / "tls").ca
    options = connect_options(make_settings(nats_creds=creds, nats_ca=ca))
    assert options["user_credentials"] == str(creds)
    assert isinstance(options["tls"], ssl.SSLContext)
    assert options["tls"].verify_mode is ssl.CERT_REQUIRED and options["tls"].check_hostname
