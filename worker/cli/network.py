"""Network-side commands: sign and publish configuration snapshots, publish models, admit
and revoke nodes.

`config sign`, `config publish`, `models publish`, `admit` and `revoke` are what a network's
authority runs (with the authority role's NATS credentials); a node never needs them.
Output meant for pasting goes to stdout, progress to stderr.
"""

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from schemas.codec import validate
from schemas.envelope import EnvelopeType, unpack_envelope
from schemas.errors import SchemaError
from schemas.snapshot import ModelSpec, Snapshot
from worker.cli.base import CliError, add_command
from worker.client import connect
from worker.core.errors import ConfigRejected, SignatureError
from worker.core.progress import ProgressReport
from worker.core.registry import (
    publish_record,
    registry_bucket,
    sign_admission,
    sign_revocation,
)
from worker.core.settings import Settings
from worker.core.signing import check_signature, load_key_file, parse_public_key
from worker.models import objectstore
from worker.node.snapshots import check_snapshot, config_bucket, publish_snapshot

log = logging.getLogger(__name__)


def _read_body(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        try:
            value = json.loads(data)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path} is not valid JSON ({exc}); fix the file") from exc
    else:
        try:
            value = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise CliError(f"{path} is neither a JSON object nor a msgpack map") from exc
    if not isinstance(value, dict):
        raise CliError(f"{path} must hold one snapshot body object")
    return value


def cmd_config_sign(args: argparse.Namespace) -> int:
    body = _read_body(Path(args.body))
    try:
        snapshot = validate(Snapshot, body)
    except SchemaError as exc:
        raise CliError(f"invalid snapshot body: {exc}; fix {args.body}") from exc
    key = load_key_file(Path(args.key))
    envelope = key.sign("config", body)
    if args.out:
        Path(args.out).write_bytes(envelope)
    elif sys.stdout.isatty():
        raise CliError("refusing to write a binary envelope to a terminal; pass --out FILE")
    else:
        sys.stdout.buffer.write(envelope)
        sys.stdout.buffer.flush()
    sys.stderr.write(f"signed config version {snapshot.version} with authority key {key.node_id}\n")
    return 0


async def _connect(settings: Settings, url: str) -> Any:
    """A connection with the settings' credentials and CA, to `url` (`--nats-url`)."""
    return await connect(
        settings.model_copy(update={"nats_url": url}), hint="start it or pass --nats-url"
    )


def cmd_config_publish(args: argparse.Namespace) -> int:
    data = Path(args.envelope).read_bytes()
    try:
        env = unpack_envelope(data)
        if env.typ != EnvelopeType.CONFIG:
            raise CliError(f"{args.envelope} is a {env.typ.value} envelope, not a config one")
        check_signature(env)
        if args.authority:
            check_snapshot(data, {parse_public_key(k) for k in args.authority}, network=None)
    except (SchemaError, SignatureError, ConfigRejected) as exc:
        raise CliError(
            f"{args.envelope}: {exc}; sign it with 'resultity-node config sign'"
        ) from exc
    settings = Settings()
    url = args.nats_url or settings.nats_url
    bucket = config_bucket(settings)

    async def publish() -> int:
        nc = await _connect(settings, url)
        try:
            revision: int = await publish_snapshot(
                nc, bucket, data, replicas=settings.stream_replicas
            )
        finally:
            await nc.close()
        return revision

    revision = asyncio.run(publish())
    sys.stdout.write(f"published {args.envelope} to {bucket}/snapshot revision {revision}\n")
    return 0


def cmd_models_publish(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path} is not a file; pass the model file or tar archive to publish")
    settings = Settings()
    url = args.nats_url or settings.nats_url
    bucket = args.bucket or settings.models_bucket
    name = args.name or f"{args.id}-{args.version}"
    size = path.stat().st_size

    async def upload() -> Any:
        nc = await _connect(settings, url)
        try:
            return await objectstore.put_file(
                nc.jetstream(), bucket, name, path, progress=ProgressReport(size, "model_upload")
            )
        finally:
            await nc.close()

    info = asyncio.run(upload())
    sha256 = objectstore.digest_hex(info)
    spec = {
        "id": args.id,
        "version": args.version,
        "sha256": sha256,
        "size": info.size,
        "source": f"nats-object://{bucket}/{name}",
        "validation": [],
    }
    try:
        validate(ModelSpec, spec)
    except SchemaError as exc:
        raise CliError(f"the model spec would be invalid: {exc}; fix --id/--version") from exc
    sys.stdout.write(json.dumps(spec, indent=2) + "\n")
    return 0


def _authority_key(path: str | None) -> Any:
    if not path:
        raise CliError("pass --key, the authority key file that signs the record")
    return load_key_file(Path(path))


def cmd_admit(args: argparse.Namespace) -> int:
    node_id = parse_public_key(args.node_id).hex()
    key = _authority_key(args.key)
    settings = Settings()
    expires_at = time.time() + args.expires_in_days * 86400 if args.expires_in_days else None
    envelope = sign_admission(
        key, node_id, settings.network, expires_at=expires_at, models=args.model or None
    )
    revision = asyncio.run(_publish_record(settings, args.nats_url, node_id, envelope))
    sys.stdout.write(
        f"admitted node {node_id} to {settings.network} (registry {registry_bucket(settings)} "
        f"revision {revision})\n"
    )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    node_id = parse_public_key(args.node_id).hex()
    key = _authority_key(args.key)
    settings = Settings()
    envelope = sign_revocation(key, node_id, settings.network)
    revision = asyncio.run(_publish_record(settings, args.nats_url, node_id, envelope))
    sys.stdout.write(
        f"revoked node {node_id} on {settings.network} (registry {registry_bucket(settings)} "
        f"revision {revision})\n"
    )
    return 0


async def _publish_record(settings: Settings, url: str | None, node_id: str, data: bytes) -> int:
    nc = await _connect(settings, url or settings.nats_url)
    try:
        return await publish_record(nc, settings, node_id, data)
    finally:
        await nc.close()


def _register_registry(sub: Any) -> None:
    for name, what, handler in (
        ("admit", "admit a node to the network: sign its record into the registry", cmd_admit),
        ("revoke", "revoke a node: sign a revocation record into the registry", cmd_revoke),
    ):
        p = add_command(
            sub,
            name,
            f"network side: {what}",
            f"RESULTITY_NATS_NKEY_SEED_FILE=authority.nk resultity-node {name} <node id> "
            "--key authority.key",
        )
        p.add_argument("node_id", help="the node's id (hex of its Ed25519 public key)")
        p.add_argument("--key", required=True, help="authority key file (made by 'keygen')")
        p.add_argument("--nats-url", help="NATS URL (default: RESULTITY_NATS_URL)")
        if name == "admit":
            p.add_argument("--expires-in-days", type=float, help="the admission expires then")
            p.add_argument(
                "--model", action="append", default=[], help="a model it may serve; repeatable"
            )
        p.set_defaults(handler=handler)


def register(sub: Any) -> None:
    _register_registry(sub)
    config = add_command(
        sub,
        "config",
        "network side: sign and publish configuration snapshots",
        "resultity-node config sign snapshot.json --key authority.key --out snapshot.env",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = add_command(
        config_sub,
        "sign",
        "validate a snapshot body (JSON or msgpack) and sign it with an authority key",
        "resultity-node config sign snapshot.json --key authority.key --out snapshot.env",
    )
    p.add_argument("body", help="snapshot body file: a JSON object or a msgpack map")
    p.add_argument("--key", required=True, help="authority key file (made by 'keygen')")
    p.add_argument("--out", help="envelope file to write (default: stdout, if not a terminal)")
    p.set_defaults(handler=cmd_config_sign)
    p = add_command(
        config_sub,
        "publish",
        "put a signed snapshot envelope in the config bucket that nodes watch",
        "resultity-node config publish snapshot.env --nats-url nats://127.0.0.1:4222",
    )
    p.add_argument("envelope", help="signed envelope file (from 'config sign')")
    p.add_argument("--nats-url", help="NATS URL (default: RESULTITY_NATS_URL)")
    p.add_argument(
        "--authority",
        action="append",
        default=[],
        help="also check it is signed by this authority public key (hex); repeatable",
    )
    p.set_defaults(handler=cmd_config_publish)

    models = add_command(
        sub,
        "models",
        "network side: publish model files to the object store",
        "resultity-node models publish model.tar --id tiny --version 1",
    )
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = add_command(
        models_sub,
        "publish",
        "upload a model file or tar archive and print the spec to paste into a snapshot",
        "resultity-node models publish model.tar --id tiny --version 1 --bucket rst_models",
    )
    p.add_argument("file", help="model file, or tar archive of a model directory")
    p.add_argument("--id", required=True, help="model id ([A-Za-z0-9_-], 1-64 chars)")
    p.add_argument("--version", required=True, help="model version string")
    p.add_argument("--bucket", help="object store bucket (default: RESULTITY_MODELS_BUCKET)")
    p.add_argument("--name", help="object name (default: ID-VERSION)")
    p.add_argument("--nats-url", help="NATS URL (default: RESULTITY_NATS_URL)")
    p.set_defaults(handler=cmd_models_publish)
