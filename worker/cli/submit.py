"""Client commands: `submit` a job and print its verified result."""

import argparse
import asyncio
import json
import sys
from typing import Any

from schemas.stream import StreamBody
from worker.cli.base import CliError, add_command
from worker.client import cancel, connect, current_snapshot, new_job_id, submit
from worker.devtools.devhome import client_settings


def cmd_submit(args: argparse.Namespace) -> int:
    network = client_settings()
    print(network.describe(), file=sys.stderr)
    settings = network.settings
    params: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.temperature is not None:
        params["temperature"] = args.temperature

    async def go() -> Any:
        nc = await connect(settings, hint="start 'resultity-node dev' or set RESULTITY_NATS_URL")
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
            sink = None
            if args.stream:
                job["stream"] = True
                sink = print_stream
            try:
                return await submit(nc, settings, job, wait_s=args.timeout, on_stream=sink)
            except asyncio.CancelledError:  # Ctrl-C: the job is not wanted any more
                await cancel(nc, settings, job["job_id"])
                print(f"\ncancelled job {job['job_id']}", file=sys.stderr)
                raise
        finally:
            await nc.close()

    try:
        outcome = asyncio.run(go())
    except KeyboardInterrupt:
        return 130
    except TimeoutError as exc:
        raise CliError(
            f"no result within {args.timeout:.0f}s; is a node serving the model? "
            "check 'resultity-node status'"
        ) from exc
    if args.json:
        print(json.dumps(outcome.result.model_dump(mode="json"), indent=2))
    elif args.stream:
        print_outcome(outcome, text=False)
    else:
        print_outcome(outcome)
    return 0


def print_stream(body: StreamBody) -> None:
    """Partial output as it arrives (a new attempt starts over on a fresh line)."""
    if body.seq == 0 and body.attempt > 1:
        print(f"\n[attempt {body.attempt}]", file=sys.stderr)
    sys.stdout.write(body.text)
    if body.finish_reason is not None:
        sys.stdout.write("\n")
    sys.stdout.flush()


def print_outcome(outcome: Any, *, text: bool = True) -> None:
    r = outcome.result
    if text:
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


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "submit",
        "submit a job, wait for its signed result, verify and print it",
        'resultity-node submit "The capital of France is" --max-tokens 16 --stream\n'
        "  (Ctrl-C cancels the job on the node)",
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
    p.add_argument(
        "--stream", action="store_true", help="print tokens as they arrive, then the proof"
    )
    p.set_defaults(handler=cmd_submit)
