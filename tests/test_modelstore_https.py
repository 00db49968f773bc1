"""Model downloads over https from a local TLS server: resume after a dropped connection."""

import datetime
import hashlib
import ipaddress
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from schemas.snapshot import ModelSpec
from worker.core.errors import ModelInvalid, ModelUnavailable
from worker.models.store import ModelStore

DATA = os.urandom(3_000_000)


def make_cert(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Server:
    def __init__(self) -> None:
        self.drop_once_at: int | None = None
        self.ranges = True
        self.requests: list[str | None] = []
        self.body = DATA


class Handler(BaseHTTPRequestHandler):
    server: "TLSServer"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        range_header = self.headers.get("Range")
        state.requests.append(range_header)
        if self.path != "/model.bin":
            self.send_error(404)
            return
        body = state.body
        start = 0
        if range_header and state.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        part = body[start:]
        if state.drop_once_at is not None:
            cut, state.drop_once_at = state.drop_once_at, None
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()
            return
        self.wfile.write(part)


class TLSServer(ThreadingHTTPServer):
    state: Server


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[TLSServer, ssl.SSLContext]]:
    cert, key = make_cert(tmp_path)
    server = TLSServer(("127.0.0.1", 0), Handler)
    server.state = Server()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    try:
        yield server, client_ctx
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def spec_for(server: TLSServer, path: str = "/model.bin", **over: object) -> ModelSpec:
    fields: dict[str, object] = {
        "id": "m1",
        "version": "1",
        "sha256": hashlib.sha256(DATA).hexdigest(),
        "size": len(DATA),
        "source": f"https://127.0.0.1:{server.server_address[1]}{path}",
    }
    fields.update(over)
    return ModelSpec.model_validate(fields)


def store_for(tmp_path: Path, ctx: ssl.SSLContext) -> ModelStore:
    return ModelStore(tmp_path / "cache", ssl_context=ctx, attempts=3, backoff_s=0.01)


def assert_clean(store: ModelStore) -> None:
    assert store.cached() == set()
    assert list((store.cache_dir / "tmp").iterdir()) == []


async def test_dropped_connection_resumes_with_range(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    server, ctx = https
    server.state.drop_once_at = 1_234_567
    store = store_for(tmp_path, ctx)
    blob = await store.fetch(spec_for(server))
    assert blob.read_bytes() == DATA
    assert server.state.requests == [None, "bytes=1234567-"]


async def test_server_without_ranges_restarts_from_zero(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    server, ctx = https
    server.state.drop_once_at = 1_000_000
    server.state.ranges = False
    store = store_for(tmp_path, ctx)
    blob = await store.fetch(spec_for(server))
    assert blob.read_bytes() == DATA
    assert len(server.state.requests) == 2


async def test_missing_url_is_unavailable(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    server, ctx = https
    store = store_for(tmp_path, ctx)
    with pytest.raises(ModelUnavailable, match="HTTP 404"):
        await store.fetch(spec_for(server, path="/absent"))
    assert_clean(store)
    assert len(server.state.requests) == 1  # not retried


async def test_tampered_and_short_bodies_are_refused(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    server, ctx = https
    store = store_for(tmp_path, ctx)
    server.state.body = DATA[:-1] + bytes([DATA[-1] ^ 1])
    with pytest.raises(ModelInvalid, match="SHA-256 mismatch"):
        await store.fetch(spec_for(server))
    assert_clean(store)
    server.state.body = DATA[:-10]
    with pytest.raises(ModelInvalid, match=f"expected {len(DATA)} bytes, got {len(DATA) - 10}"):
        await store.fetch(spec_for(server))
    assert_clean(store)


async def test_untrusted_certificate_is_refused(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    server, _ = https
    store = ModelStore(tmp_path / "cache", attempts=1)
    with pytest.raises(ModelUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await store.fetch(spec_for(server))
    assert_clean(store)
