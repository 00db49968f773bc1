"""A local certificate authority for a dev or compose network's NATS TLS (`cryptography`).

`ensure_local_ca(directory, names)` makes, once, `ca.pem` (the CA a participant pins with
`RESULTITY_NATS_CA`), and `server.pem`/`server-key.pem` for the NATS servers, valid for
`names` (host names and IP addresses). All files are mode 0600; the CA key stays in the
directory, never on a server.
"""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worker.core.credentials import write_secret

VALID_DAYS = 3650


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def ensure_local_ca(
    directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """The CA and a server certificate for `names` under `directory`, made if missing."""
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    for path in (files.ca, files.cert, files.key, directory / "ca-key.pem"):
        path.unlink(missing_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("resultity local CA"))
        .issuer_name(_name("resultity local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
        .add_extension(
            # Routes between cluster servers use the same certificate both ways.
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_secret(directory / "ca-key.pem", _pem_key(ca_key))
    write_secret(files.key, _pem_key(server_key))
    write_secret(files.cert, server_cert.public_bytes(serialization.Encoding.PEM))
    write_secret(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    return files
