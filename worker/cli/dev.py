"""`resultity-node dev`: the whole network on this machine."""

import argparse
import asyncio
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from worker.cli.base import add_command
from worker.cli.submit import print_outcome
from worker.core.logs import quiet_console
from worker.devtools.devhome import DEFAULT_DEV_HOME, HOME_VARIABLE, make_home
from worker.devtools.devnet import DevPlan, choose, result_note, run_dev

BAR_WIDTH = 30


def cmd_dev(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser().resolve()
    make_home(home)  # before the log file is created in it
    log_file = home / "dev.log"
    quiet_console(log_file, verbose=args.verbose or args.dev_verbose)
    print(f"resultity-node dev: full log in {log_file}", file=sys.stderr, flush=True)
    model_dirs = [Path(m).expanduser().resolve() for m in args.model or []]
    model_dir = model_dirs[0] if model_dirs else None
    engine, backend = choose(args.engine, args.backend, model_dir)
    plan = DevPlan(
        home,
        args.port,
        engine,
        backend,
        args.prompt,
        model_dir,
        more_model_dirs=tuple(model_dirs[1:]),
        on_build_step=build_bar(),
        gateway_port=None if args.no_gateway else args.gateway_port,
        metrics_port=None if args.no_metrics else args.metrics_port,
    )

    def show(outcome: Any) -> None:
        print("\n=== verified signed result ===", flush=True)
        print_outcome(outcome)
        note = result_note(plan)
        if note is not None:
            print(f"\n{note}")
        if not args.once:
            print("\nThe node keeps serving (Ctrl-C stops it). In another shell:")
            for command in client_commands(home):
                print(f"  {command}")
            print(f"Full log: {log_file}", flush=True)

    asyncio.run(run_dev(plan, on_result=show, serve_forever=not args.once))
    return 0


def client_commands(home: Path) -> list[str]:
    """The client commands that reach this dev network, exactly as they can be typed."""
    program = _program()
    if home != DEFAULT_DEV_HOME.resolve():
        program = f"{HOME_VARIABLE}={shlex.quote(str(home))} {program}"
    return [f'{program} submit "Hello"', f"{program} status"]


def _program() -> str:
    """`resultity-node` when the shell finds this very one, else its full path."""
    beside = Path(sys.executable).parent / "resultity-node"
    if not beside.exists():
        return f"{shlex.quote(sys.executable)} -m worker.cli.main"
    found = shutil.which("resultity-node")
    if found is not None and Path(found).resolve() == beside.resolve():
        return "resultity-node"
    return shlex.quote(str(beside))


def build_bar() -> Any:
    """Show a runtime image build's steps: a bar on a terminal, one line each otherwise."""
    tty = sys.stderr.isatty()

    def on_step(number: int, total: int, instruction: str) -> None:
        if tty:
            filled = "#" * (BAR_WIDTH * number // max(total, 1))
            width = shutil.get_terminal_size().columns
            line = f"  build [{filled:<{BAR_WIDTH}}] {number}/{total} {instruction}"
            sys.stderr.write("\r" + line[: width - 1].ljust(width - 1))
            if number == total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(f"  build step {number}/{total}: {instruction[:100]}\n")
        sys.stderr.flush()

    return on_step


def register(sub: Any) -> None:
    p = add_command(
        sub,
        "dev",
        "run the whole network locally and print one verified signed result",
        "resultity-node dev            # then, in another shell: resultity-node submit Hi",
    )
    p.add_argument("--home", default=str(DEFAULT_DEV_HOME), help="keys, NATS data, models, log")
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
    p.add_argument(
        "--model",
        metavar="DIR",
        action="append",
        help="serve this Hugging Face model directory (config, tokenizer, safetensors) "
        "instead of the demo model; give it twice for a loadout of two models, switched on "
        "demand (resultity-node status shows both and their states)",
    )
    p.add_argument("--prompt", default="Resultity nodes sign every result", help="demo prompt")
    p.add_argument("--once", action="store_true", help="exit after the demo result")
    p.add_argument(
        "--verbose",
        dest="dev_verbose",
        action="store_true",
        help="stream every log event to the console (it always goes to the log file)",
    )
    p.add_argument(
        "--gateway-port", type=int, default=8000, help="port of the OpenAI gateway on 127.0.0.1"
    )
    p.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI gateway")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="port of the node's Prometheus metrics on 127.0.0.1",
    )
    p.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    p.set_defaults(handler=cmd_dev)
