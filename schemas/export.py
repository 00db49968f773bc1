"""JSON Schema of every wire payload, written to `schemas/json/<name>.json`, and the AsyncAPI
document of the subjects, `schemas/asyncapi.json`.

`python -m schemas.export` regenerates the files; `python -m schemas.export --check` exits 1
when any of them is stale. The envelope's schema is written by hand: its fields are msgpack
`bin`, which JSON Schema has no type for.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas import asyncapi
from schemas.admission import Admission
from schemas.envelope import ENVELOPE_VERSION, EnvelopeType
from schemas.event import ErrorEvent, LifecycleEvent
from schemas.job import Job, Params
from schemas.node import Heartbeat, NodeStatus, StatusReply
from schemas.result import ResultBody
from schemas.snapshot import ModelSpec, RuntimeSpec, Snapshot, ValidationVector
from schemas.stream import CancelRequest, StreamBody

JSON_DIR = Path(__file__).with_name("json")
ASYNCAPI = Path(__file__).with_name("asyncapi.json")
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://resultity.network/schemas/v1/"

PAYLOADS: dict[str, type[BaseModel]] = {
    "job": Job,
    "params": Params,
    "result_body": ResultBody,
    "error_event": ErrorEvent,
    "stream_body": StreamBody,
    "cancel_request": CancelRequest,
    "lifecycle_event": LifecycleEvent,
    "heartbeat": Heartbeat,
    "node_status": NodeStatus,
    "status_reply": StatusReply,
    "snapshot": Snapshot,
    "model_spec": ModelSpec,
    "runtime_spec": RuntimeSpec,
    "validation_vector": ValidationVector,
    "admission": Admission,
}


def _bin(description: str, size: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "description": f"msgpack bin: {description}",
        "x-msgpack-type": "bin",
    }
    if size is not None:
        schema["x-msgpack-size"] = size
    return schema


def envelope_schema() -> dict[str, Any]:
    return {
        "title": "Envelope",
        "description": (
            "A signed payload. `sig` is the Ed25519 signature of "
            "b'resultity/v1/' + typ + b'\\n' + body, over the body bytes exactly as received."
        ),
        "type": "object",
        "additionalProperties": False,
        "required": ["v", "typ", "body", "key", "sig"],
        "properties": {
            "v": {"type": "integer", "const": ENVELOPE_VERSION},
            "typ": {"type": "string", "enum": [t.value for t in EnvelopeType]},
            "body": _bin("the msgpack encoding of the body map"),
            "key": _bin("the signer's Ed25519 public key", 32),
            "sig": _bin("Ed25519 signature of the signing message", 64),
        },
    }


def schemas() -> dict[str, dict[str, Any]]:
    """Every exported schema by file stem."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in PAYLOADS.items():
        out[name] = model.model_json_schema(mode="validation")
    out["envelope"] = envelope_schema()
    for name, schema in out.items():
        out[name] = {"$schema": SCHEMA_DIALECT, "$id": f"{ID_BASE}{name}.json", **schema}
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale(directory: Path | None = None) -> list[str]:
    """Names of files that are missing, different, or no longer generated."""
    directory = directory or JSON_DIR
    wanted = {f"{name}.json": render(schema) for name, schema in schemas().items()}
    names = [n for n, text in wanted.items() if _read(directory / n) != text]
    names += [p.name for p in directory.glob("*.json") if p.name not in wanted]
    if directory == JSON_DIR and _read(ASYNCAPI) != render(asyncapi.document()):
        names.append(ASYNCAPI.name)
    return sorted(names)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def write(directory: Path | None = None) -> list[Path]:
    directory = directory or JSON_DIR
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    wanted = schemas()
    for old in directory.glob("*.json"):
        if old.stem not in wanted:
            old.unlink()
    for name, schema in wanted.items():
        path = directory / f"{name}.json"
        text = render(schema)
        if _read(path) != text:
            path.write_text(text)
            written.append(path)
    if directory == JSON_DIR and _read(ASYNCAPI) != render(asyncapi.document()):
        ASYNCAPI.write_text(render(asyncapi.document()))
        written.append(ASYNCAPI)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export",
        description="Write the JSON Schema of every payload into schemas/json/.",
        epilog="example:\n  python -m schemas.export --check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any file is stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        if names:
            sys.stderr.write(
                f"stale JSON Schema in {JSON_DIR}: {', '.join(names)}; "
                "run 'python -m schemas.export'\n"
            )
            return 1
        return 0
    for path in write():
        sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
