"""The dev network's credentials: made once, every file 0600, kept across starts (a home
made before they existed gets them, nothing else changes)."""

from pathlib import Path

from worker.core.roles import Role
from worker.core.signing import write_key_file
from worker.devtools.devauth import ensure_dev_credentials


def test_credentials_are_made_once_and_private(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    node = write_key_file(home / "node.key")  # a home from before
    first = ensure_dev_credentials(home)
    files = [first.tls.ca, first.tls.cert, first.tls.key, first.api_keys_file]
    files += [home / "tls" / "ca-key.pem", *first.seeds.values()]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    assert set(first.seeds) == set(Role) and len(set(first.users.values())) == len(Role)
    assert first.api_key().startswith("rst-")
    again = ensure_dev_credentials(home)
    assert again.users == first.users and again.api_key() == first.api_key()
    assert again.tls.ca.read_bytes() == first.tls.ca.read_bytes()
    assert (home / "node.key").read_text().strip() == node.seed_hex()
