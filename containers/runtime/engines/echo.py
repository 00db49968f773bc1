"""The echo engine: instant, deterministic output from the input and the model's bytes.

For protocol, throughput and chaos tests only; it runs no model. Output token ids come from
SHAKE-256 over the model directory's hash, the prompt (or token ids) and the seed, so the
same job on the same model always gives the same answer, alone or inside any batch.

Fault injection (a test engine, so these are features): a prompt starting with `!fault:`

    !fault:crash      the process exits (status 3) mid-batch, without a result
    !fault:hang       the process sleeps forever
    !fault:garbage    non-msgpack bytes are written to the frame stream, then the batch runs
    !fault:oversize   the batch's result frame is larger than RESULTITY_MAX_FRAME_BYTES
    !fault:error      only that job gets a per-item error

Engine arguments: `slow_ms` (a delay per batch), `fault` = `noready` (never send `ready`;
also `RESULTITY_ECHO_FAULT=noready`).
"""

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgpack

from containers.runtime.config import RuntimeConfig
from containers.runtime.engines import EngineError, RawWriter
from containers.runtime.request import Request
from schemas.frames import Frame, failed, ok

log = logging.getLogger(__name__)

VERSION = "echo-1"
VOCAB_SIZE = 50000
FAULT_PREFIX = "!fault:"
GARBAGE = b"hello world\n"
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def hash_model(path: Path) -> str:
    """SHA-256 over every file under `path` (relative path, size and bytes, sorted by
    path), or over the bytes of `path` itself when it is a file."""
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        raise EngineError(f"model path {path} does not exist (is the model mounted?)")
    digest = hashlib.sha256()
    for rel, file in files:
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def render(token_ids: list[int]) -> list[str]:
    """One short word per token id."""
    n = len(_SYLLABLES)
    return [_SYLLABLES[t % n] + _SYLLABLES[(t // n) % n] for t in token_ids]


class EchoEngine:
    name = "echo"
    version = VERSION

    def __init__(
        self,
        model_hash: str,
        model_sha256: str,
        device: str,
        write_raw: RawWriter,
        *,
        slow_ms: float = 0.0,
        max_frame_bytes: int,
    ) -> None:
        self._model_hash = model_hash.encode()
        self.model_sha256 = model_sha256
        self.device = device
        self._write_raw = write_raw
        self._slow_s = slow_ms / 1000
        self._max_frame_bytes = max_frame_bytes

    @classmethod
    def load(cls, config: RuntimeConfig, write_raw: RawWriter) -> "EchoEngine":
        args: dict[str, Any] = config.engine_args
        fault = str(args.get("fault") or os.environ.get("RESULTITY_ECHO_FAULT", ""))
        if fault == "noready":
            log.warning("echo_fault fault=noready: never sending ready")
            while True:
                time.sleep(3600)
        model_hash = hash_model(config.model_dir)
        log.info("echo_model_hashed model_hash=%s", model_hash)
        return cls(
            model_hash,
            config.model_sha256 or model_hash,
            config.device or "cpu",
            write_raw,
            slow_ms=float(args.get("slow_ms", 0)),
            max_frame_bytes=config.max_frame_bytes,
        )

    def generate(self, requests: list[Request]) -> list[Frame]:
        # An event for tests that must act while a batch is inside the engine.
        log.info("echo_batch_received items=%d", len(requests))
        if self._slow_s:
            time.sleep(self._slow_s)
        return [self._one(r) for r in requests]

    def close(self) -> None:
        pass

    def _one(self, req: Request) -> Frame:
        if req.prompt is not None and req.prompt.startswith(FAULT_PREFIX):
            fault = self._fault(req)
            if fault is not None:
                return fault
        if req.prompt is not None:
            source: bytes = req.prompt.encode()
            prompt_tokens = len(source)
        else:
            assert req.prompt_token_ids is not None
            source = msgpack.packb(req.prompt_token_ids)
            prompt_tokens = len(req.prompt_token_ids)
        material = b"\0".join([self._model_hash, source, str(req.seed).encode()])
        raw = hashlib.shake_256(material).digest(3 * req.max_tokens)
        token_ids = [
            int.from_bytes(raw[i : i + 3], "big") % VOCAB_SIZE for i in range(0, len(raw), 3)
        ]
        words = render(token_ids)
        finish = "length"
        if req.stop:
            for i in range(len(words)):
                text = " ".join(words[: i + 1])
                if any(s in text for s in req.stop):
                    token_ids, words, finish = token_ids[: i + 1], words[: i + 1], "stop"
                    break
        return ok(req.job_id, " ".join(words), token_ids, finish, prompt_tokens)

    def _fault(self, req: Request) -> Frame | None:
        assert req.prompt is not None
        words = req.prompt[len(FAULT_PREFIX) :].split()
        fault = words[0] if words else ""
        log.warning("echo_fault fault=%s job_id=%s", fault, req.job_id)
        if fault == "crash":
            os._exit(3)
        if fault == "hang":
            while True:
                time.sleep(3600)
        if fault == "garbage":
            self._write_raw(GARBAGE)
            return None
        if fault == "oversize":
            return ok(req.job_id, "x" * (self._max_frame_bytes + 1), [], "length", 0)
        if fault == "error":
            return failed(req.job_id, "injected error (echo fault)")
        return failed(req.job_id, f"unknown echo fault {fault!r}")
