"""The `resultity-node` command line: the only module that prints."""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worker.errors import NodeError

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user-facing failure: one line saying what to do; exit status 2."""


def _parser(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def cmd_keygen(args: argparse.Namespace) -> int:
    from worker.signing import write_key_file

    key = write_key_file(Path(args.out))
    print(key.node_id)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from worker.signing import parse_public_key, verify

    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    authorities = [parse_public_key(k) for k in args.authority]
    verified = verify(data, authority_keys=authorities)
    print(
        json.dumps(
            {
                "typ": verified.typ.value,
                "signer": verified.signer,
                "body": _jsonable(verified.body),
            },
            indent=2,
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from worker.agent import run_until_signalled
    from worker.settings import Settings
    from worker.signing import load_key_file

    settings = Settings()
    key = load_key_file(settings.key_file)
    asyncio.run(run_until_signalled(settings, key))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    import asyncio

    from worker.client import connect
    from worker.provision import provision
    from worker.settings import Settings

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


def cmd_submit(args: argparse.Namespace) -> int:
    import asyncio

    from worker.client import connect, current_snapshot, new_job_id, submit
    from worker.settings import Settings

    settings = Settings()
    params: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.temperature is not None:
        params["temperature"] = args.temperature

    async def go() -> Any:
        nc = await connect(
            settings.nats_url, hint="start 'resultity-node dev' or set RESULTITY_NATS_URL"
        )
        try:
            model = args.model
            if model is None:
                snapshot = await current_snapshot(nc, settings)
                if snapshot is None:
                    raise CliError("no verified snapshot names a model; pass --model ID")
                model = snapshot.model(settings.model).id  # type: ignore[union-attr]
            job: dict[str, Any] = {
                "job_id": args.job_id or new_job_id(),
                "model_id": model,
                "params": params,
            }
            if args.tokens:
                job["prompt_token_ids"] = [int(t) for t in args.prompt.replace(",", " ").split()]
            else:
                job["prompt"] = args.prompt
            return await submit(nc, settings, job, wait_s=args.timeout)
        finally:
            await nc.close()

    try:
        outcome = asyncio.run(go())
    except TimeoutError as exc:
        raise CliError(
            f"no result within {args.timeout:.0f}s; is a node serving the model? "
            "check 'resultity-node status'"
        ) from exc
    if args.json:
        print(json.dumps(outcome.result.model_dump(mode="json"), indent=2))
    else:
        print_outcome(outcome)
    return 0


def print_outcome(outcome: Any) -> None:
    r = outcome.result
    print(r.output.text)
    print(
        f"  job        {r.job_id}  ({r.output.finish_reason}, {r.usage.completion_tokens} tokens)"
    )
    print(f"  token_ids  {r.output.token_ids}")
    print(f"  signed by  node {r.node_id}  (Ed25519 signature verified)")
    print(f"  model      {r.model.id} v{r.model.version}  sha256 {r.model.sha256}")
    print(f"  runtime    {r.runtime.engine} {r.runtime.engine_version} on {r.runtime.device}")
    print(f"  image      {r.runtime.image}")
    print(f"  input      sha256 {r.input_sha256}  (matches the bytes sent)")


def cmd_dev(args: argparse.Namespace) -> int:
    import asyncio

    from worker.devnet import DevPlan, choose, run_dev

    engine, backend = choose(args.engine, args.backend)
    plan = DevPlan(Path(args.home).expanduser(), args.port, engine, backend, args.prompt)

    def show(outcome: Any) -> None:
        print("\n=== verified signed result ===", flush=True)
        print_outcome(outcome)
        if not args.once:
            print(
                '\nthe node keeps serving; try: resultity-node submit "Hello"  (Ctrl-C stops)',
                flush=True,
            )

    asyncio.run(run_dev(plan, on_result=show, serve_forever=not args.once))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    import msgpack

    from worker.client import connect
    from worker.settings import Settings
    from worker.signing import load_key_file

    settings = Settings()
    node_id = args.node or load_key_file(settings.key_file).node_id

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resultity-node",
        description="Resultity node: signed, supervised LLM inference for a NATS network.",
        epilog="example:\n  resultity-node dev",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _parser(
        sub,
        "keygen",
        "create a node key file and print the node id",
        "resultity-node keygen --out ~/.resultity/node.key",
    )
    p.add_argument("--out", required=True, help="path of the new key file (mode 0600)")
    p.set_defaults(handler=cmd_keygen)

    p = _parser(
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
        help="trusted authority public key (hex) for config envelopes; repeatable",
    )
    p.set_defaults(handler=cmd_verify)

    p = _parser(
        sub,
        "run",
        "run the node agent until SIGTERM/SIGINT (settings: RESULTITY_*)",
        "RESULTITY_NATS_URL=nats://10.0.0.5:4222 RESULTITY_AUTHORITY_KEYS=<hex> resultity-node run",
    )
    p.set_defaults(handler=cmd_run)

    p = _parser(
        sub,
        "provision",
        "create the JetStream streams and the job consumers (idempotent)",
        "resultity-node provision --model tiny-llama",
    )
    p.add_argument("--model", action="append", default=[], help="model id; repeatable")
    p.set_defaults(handler=cmd_provision)

    p = _parser(
        sub,
        "submit",
        "submit a job, wait for its signed result, verify and print it",
        'resultity-node submit "The capital of France is" --max-tokens 16',
    )
    p.add_argument("prompt", help="prompt text, or token ids with --tokens")
    p.add_argument("--tokens", action="store_true", help="the prompt is token ids: '1 2 3'")
    p.add_argument("--model", help="model id (default: the snapshot's served model)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--job-id", help="job id (default: random)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    p.add_argument("--json", action="store_true", help="print the verified result body as JSON")
    p.set_defaults(handler=cmd_submit)

    p = _parser(
        sub,
        "dev",
        "run the whole network locally and print one verified signed result",
        "resultity-node dev            # then, in another shell: resultity-node submit Hi",
    )
    p.add_argument("--home", default="~/.resultity/dev", help="keys, NATS data, model cache")
    p.add_argument("--port", type=int, default=4222, help="NATS client port (0: any free)")
    p.add_argument(
        "--engine",
        choices=["auto", "echo", "vllm"],
        default="auto",
        help="auto: vllm (tiny Llama) with Docker, else echo",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "docker", "process"],
        default="auto",
        help="auto: docker when a Docker engine answers, else a local process",
    )
    p.add_argument("--prompt", default="Resultity nodes sign every result", help="demo prompt")
    p.add_argument("--once", action="store_true", help="exit after the demo result")
    p.set_defaults(handler=cmd_dev)

    p = _parser(
        sub, "status", "ask a running node for its state", "resultity-node status --node <node id>"
    )
    p.add_argument("--node", help="node id (default: the one of RESULTITY_KEY_FILE)")
    p.set_defaults(handler=cmd_status)

    for register in _extensions():
        register(sub, _parser)
    return parser


def _extensions() -> list[Callable[[Any, Callable[..., argparse.ArgumentParser]], None]]:
    """Subcommands that live beside the code they drive, each `register(sub, make_parser)`."""
    from worker import commands

    return commands.REGISTRY


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from worker.logs import setup_logging

    setup_logging(verbose=args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (NodeError, CliError, ValueError, OSError) as exc:
        print(f"resultity-node {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
