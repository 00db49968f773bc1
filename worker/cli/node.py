"""Node commands: `keygen`, `verify`, `run`, `provision`, `status`."""

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import msgpack

from schemas.envelope import EnvelopeType
from worker.cli.base import CliError, add_command, jsonable
from worker.client import connect
from worker.core.settings import Settings
from worker.core.signing import load_key_file, parse_public_key, verify, write_key_file
from worker.devtools.devhome import client_settings
from worker.jobs.provision import provision
from worker.node.agent import run_until_signalled


def cmd_keygen(args: argparse.Namespace) -> int:
    key = write_key_file(Path(args.out))
    print(key.node_id)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    keys = args.authority
    network = None
    if not keys:
        # No key given: the authority keys of the network client commands talk to.
        network = client_settings()
        keys = list(network.settings.authority_keys)
    authorities = [parse_public_key(k) for k in keys]
    verified = verify(data, authority_keys=authorities)
    if network is not None and verified.typ is EnvelopeType.CONFIG:
        print(f"{network.describe()}: its authority keys trusted", file=sys.stderr)
    print(
        json.dumps(
            {
                "typ": verified.typ.value,
                "signer": verified.signer,
                "body": jsonable(verified.body),
            },
            indent=2,
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings()
    key = load_key_file(settings.key_file)
    asyncio.run(run_until_signalled(settings, key))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    settings = Settings()

    async def go() -> None:
        nc = await connect(settings.nats_url)
        try:
            await provision(nc.jetstream(), settings, list(args.model))
        finally:
            await nc.close()

    asyncio.run(go())
    print(f"provisioned streams and consumers for models: {', '.join(args.model) or '(none)'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    network = client_settings()
    print(network.describe(), file=sys.stderr)
    settings = network.settings
    node_id = args.node or network.node_id or load_key_file(settings.key_file).node_id

    async def go() -> Any:
        nc = await connect(settings.nats_url)
        try:
            reply = await nc.request(settings.subject("nodes", node_id, "status"), b"", timeout=3)
        except Exception as exc:
            raise CliError(f"node {node_id[:16]}... did not answer; is it running?") from exc
        finally:
            await nc.close()
        return msgpack.unpackb(reply.data)

    print(json.dumps(asyncio.run(go()), indent=2))
    return 0


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "keygen",
        "create a node key file and print the node id",
        "resultity-node keygen --out ~/.resultity/node.key",
    )
    p.add_argument("--out", required=True, help="path of the new key file (mode 0600)")
    p.set_defaults(handler=cmd_keygen)

    p = add_command(
        sub,
        "verify",
        "verify a signed envelope and print its body and signer",
        "resultity-node verify result.msgpack --authority <hex>",
    )
    p.add_argument("file", nargs="?", default="-", help="envelope file, or - for stdin")
    p.add_argument(
        "--authority",
        action="append",
        default=[],
        help="trusted authority public key (hex) for config envelopes; repeatable "
        "(default: RESULTITY_AUTHORITY_KEYS, or the running dev network's)",
    )
    p.set_defaults(handler=cmd_verify)

    p = add_command(
        sub,
        "run",
        "run the node agent until SIGTERM/SIGINT (settings: RESULTITY_*)",
        "RESULTITY_NATS_URL=nats://10.0.0.5:4222 RESULTITY_AUTHORITY_KEYS=<hex> resultity-node run",
    )
    p.set_defaults(handler=cmd_run)

    p = add_command(
        sub,
        "provision",
        "create the JetStream streams and the job consumers (idempotent)",
        "resultity-node provision --model tiny-llama",
    )
    p.add_argument("--model", action="append", default=[], help="model id; repeatable")
    p.set_defaults(handler=cmd_provision)

    p = add_command(
        sub, "status", "ask a running node for its state", "resultity-node status --node <node id>"
    )
    p.add_argument(
        "--node", help="node id (default: the running dev network's, or RESULTITY_KEY_FILE's)"
    )
    p.set_defaults(handler=cmd_status)
