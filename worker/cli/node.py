"""Node commands: `keygen`, `verify`, `run`, `provision`, `status`."""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
from pydantic import ValidationError

from schemas.envelope import EnvelopeType
from schemas.node import StatusReply
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
        nc = await connect(settings)
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
        nc = await connect(settings)
        try:
            reply = await nc.request(settings.subject("nodes", node_id, "status"), b"", timeout=3)
        except Exception as exc:
            raise CliError(f"node {node_id[:16]}... did not answer; is it running?") from exc
        finally:
            await nc.close()
        return msgpack.unpackb(reply.data)

    raw = asyncio.run(go())
    if args.json:
        print(json.dumps(raw, indent=2))
        return 0
    try:
        reply = StatusReply.model_validate(raw)
    except ValidationError:
        # A node of another version: its own words, as they came.
        print("(a reply this version cannot read field by field; raw:)", file=sys.stderr)
        print(json.dumps(raw, indent=2))
        return 0
    print(render_status(reply, time.time()))
    return 0


def render_status(reply: StatusReply, now: float) -> str:
    """The status reply as a person reads it: state, software, models, runtime, hardware."""
    lines = [
        f"node      {reply.node_id}",
        f"network   {reply.network}",
        f"state     {reply.state.value.replace('_', ' ')}, up {_duration(reply.uptime_s)}"
        + (f", pipeline {reply.pipeline}" if reply.pipeline else ""),
        "heartbeat "
        + (
            f"{_duration(max(0.0, now - reply.last_heartbeat_at))} ago"
            if reply.last_heartbeat_at is not None
            else "none sent yet"
        ),
    ]
    if reply.config_version is None:
        lines.append("config    no snapshot in force yet")
    else:
        digest = f" (envelope sha256 {reply.config_hash[:16]}...)" if reply.config_hash else ""
        lines.append(f"config    snapshot version {reply.config_version}{digest}")
    software = reply.software
    if software is not None:
        lines.append(f"software  resultity-node {software.agent_version}")
        if software.engine is not None:
            lines.append(
                f"          engine {software.engine} {software.engine_version or '?'}"
                f" in {software.runtime_image or '?'}"
            )
    lines.append(f"jobs      {reply.in_flight} in flight, {reply.completed} completed")
    lines.append(f"vectors   validation {reply.validation.value.replace('_', ' ')}")
    if reply.models:
        width = max(len(f"{m.id} {m.version}") for m in reply.models)
        for i, m in enumerate(reply.models):
            name = f"{m.id} {m.version}".ljust(width)
            reason = f" ({m.reason})" if m.reason else ""
            head = "models    " if i == 0 else "          "
            lines.append(f"{head}{name}  {m.state.value:<8} sha256 {m.sha256[:12]}...{reason}")
    else:
        lines.append("models    none approved yet")
    health = reply.health
    if health is not None:
        ping = f"{health.ping_rtt_ms:.1f} ms" if health.ping_rtt_ms is not None else "not yet"
        engine = f"{health.running} running, {health.waiting} waiting"
        if health.kv_cache_usage is not None:
            engine += f", KV cache {health.kv_cache_usage:.0%} used"
        if health.prefix_cache_hit_rate is not None:
            engine += f", prefix cache {health.prefix_cache_hit_rate:.0%} hits"
        lines.append(f"runtime   {health.restarts} restarts, last ping {ping}; {engine}")
    hardware = reply.hardware
    if hardware is not None:
        lines.append(f"hardware  {hardware.cpu.model}, {hardware.cpu.cores} cores")
        lines.append(
            f"          memory {_gib(hardware.memory.available_bytes)} free"
            f" of {_gib(hardware.memory.total_bytes)};"
            f" model cache disk {_gib(hardware.disk.free_bytes)} free"
            f" of {_gib(hardware.disk.total_bytes)}"
        )
        if not hardware.gpus:
            lines.append("          no NVIDIA GPU seen (none here, or no driver or 'gpu' extra)")
        for gpu in hardware.gpus:
            figures = [f"{_gib(gpu.memory_used_bytes)} of {_gib(gpu.memory_total_bytes)} used"]
            if gpu.utilization_ratio is not None:
                figures.append(f"{gpu.utilization_ratio:.0%} busy")
            if gpu.temperature_celsius is not None:
                figures.append(f"{gpu.temperature_celsius:.0f} °C")
            if gpu.power_watts is not None:
                figures.append(f"{gpu.power_watts:.0f} W")
            if gpu.ecc_errors_uncorrected:
                figures.append(f"{gpu.ecc_errors_uncorrected} uncorrected ECC errors")
            if gpu.throttle_reasons:
                figures.append("throttled: " + ", ".join(gpu.throttle_reasons))
            lines.append(f"          GPU {gpu.index} {gpu.name}: " + ", ".join(figures))
            lines.append(
                f"                {gpu.uuid}, driver {gpu.driver_version}"
                + (f", CUDA {gpu.cuda_version}" if gpu.cuda_version else "")
            )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


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
    p.add_argument("--json", action="store_true", help="print the node's raw reply as JSON")
    p.set_defaults(handler=cmd_status)
