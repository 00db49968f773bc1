"""Model downloads over https from a local TLS server: resume after a dropped connection,
an overall deadline against a trickling server, cancellation, free disk space."""

import asyncio
import datetime
import hashlib
import ipaddress
import os
import shutil
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
from worker.models.store import ModelLimits, ModelStore

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
        self.trickle = False  # one byte at a time, each well within the idle timeout
        self.stop = threading.Event()
        self.sent_some = threading.Event()
        self.client_gone = threading.Event()


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
        if state.trickle:
            try:
                for i in range(len(part)):
                    self.wfile.write(part[i : i + 1])
                    self.wfile.flush()
                    state.sent_some.set()
                    if state.stop.wait(0.02):
                        return
            except OSError:
                state.client_gone.set()
            return
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
        server.state.stop.set()
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


async def test_trickling_server_hits_the_overall_deadline(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    """Issue 11, item 10: bytes that keep coming, each within the idle timeout, no longer
    keep a fetch alive forever: all attempts together end at grace + size / min rate."""
    server, ctx = https
    server.state.trickle = True
    limits = ModelLimits(fetch_grace_s=0.5, fetch_min_bytes_per_s=1e12)
    store = ModelStore(tmp_path / "cache", ssl_context=ctx, attempts=3, limits=limits)
    with pytest.raises(ModelUnavailable, match="not fetched within"):
        await store.fetch(spec_for(server))
    assert_clean(store)
    assert await asyncio.to_thread(server.state.client_gone.wait, 10)


async def test_cancelled_fetch_stops_its_thread_and_removes_the_partial_file(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    """A newer snapshot cancels an apply in progress: the download thread must stop (its
    connection closes) and nothing partial stays in the cache."""
    server, ctx = https
    server.state.trickle = True
    store = store_for(tmp_path, ctx)
    task = asyncio.create_task(store.fetch(spec_for(server)))
    assert await asyncio.to_thread(server.state.sent_some.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_clean(store)
    assert await asyncio.to_thread(server.state.client_gone.wait, 10)


async def test_no_download_without_room_on_disk(
    tmp_path: Path, https: tuple[TLSServer, ssl.SSLContext]
) -> None:
    server, ctx = https
    store = store_for(tmp_path, ctx)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ModelUnavailable, match="not enough disk space"):
        await store.fetch(spec_for(server, size=free + 1))
    assert_clean(store)
    assert server.state.requests == []
