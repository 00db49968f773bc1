"""The echo engine: deterministic output from the input and the model's bytes, one token
per request per step, with an optional delay per step.

For protocol, streaming, cancellation and chaos tests; it runs no model. Output token ids
come from SHAKE-256 over the model directory's hash, the input and the seed, so the same
job on the same model always gives the same answer, alone or beside any other requests.
`messages` are rendered as "role: content" lines (echo has no tokenizer and no chat
template). Of the sampling parameters only `max_tokens`, `seed` and `stop` shape the output;
the others (temperature, top_p/top_k, logprobs, penalties, response_format) are accepted and
ignored: echo returns no logprobs and no JSON.

Fault injection (a test engine, so these are features): a prompt starting with `!fault:`

    !fault:crash          the process exits (status 3) at the request's first step
    !fault:hang           two tokens, then the engine loop blocks forever (pings go unanswered)
    !fault:garbage        non-msgpack bytes are written to the frame stream
    !fault:oversize       a `done` frame larger than RESULTITY_MAX_FRAME_BYTES, written raw
    !fault:error          only that request fails (`failed`, code `engine`)
    !fault:unknown_id     a `partial` for a request id the agent never sent
    !fault:done_twice     two `done` frames for the request
    !fault:out_of_order   a `partial` after the request's `done`
    !fault:endless        `partial` frames forever, past max_tokens
    !fault:bad_request    refused at `add` (`failed`, code `bad_request`)

Engine arguments: `token_delay_ms` (sleep per engine step, so tests can stream, cancel and
hang mid-generation), `max_active` (reported in `ready`, default 256), `fault` = `noready`
(never send `ready`; also `RESULTITY_ECHO_FAULT=noready`).
"""

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from containers.runtime.config import RuntimeConfig
from containers.runtime.engines import EngineError, RawWriter, StepFrame
from containers.runtime.request import RequestError
from schemas import frames, runtime_env
from schemas.frames import DeviceInfo, EngineStats, FailCode, RequestItem
from schemas.limits import max_tokens as output_tokens

log = logging.getLogger(__name__)

VERSION = "echo-2"
VOCAB_SIZE = 50000
FAULT_PREFIX = "!fault:"
GARBAGE = b"hello world\n"
HANG_AFTER_TOKENS = 2
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


def _source(item: RequestItem) -> tuple[bytes, int]:
    """The bytes the output derives from, and the prompt's length in tokens."""
    if "prompt" in item:
        return item["prompt"].encode(), len(item["prompt"].encode())
    if "messages" in item:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"])
        return text.encode(), len(text.encode())
    ids = item["prompt_token_ids"]
    return msgpack.packb(ids), len(ids)


@dataclass(eq=False)
class _Run:
    request_id: int
    stream: bool
    token_ids: list[int]
    words: list[str]
    finish_reason: str
    prompt_tokens: int
    fault: str = ""
    pos: int = 0
    added_at: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0

    def text(self, start: int, end: int) -> str:
        return (" " if start > 0 else "") + " ".join(self.words[start:end])


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
        token_delay_ms: float = 0.0,
        max_active: int = 256,
        max_frame_bytes: int,
    ) -> None:
        self._model_hash = model_hash.encode()
        self.model_sha256 = model_sha256
        self.device = device
        self.devices: list[DeviceInfo] = []
        self.max_active = max_active
        self._write_raw = write_raw
        self._delay_s = token_delay_ms / 1000
        self._max_frame_bytes = max_frame_bytes
        self._runs: dict[int, _Run] = {}

    @classmethod
    def load(cls, config: RuntimeConfig, write_raw: RawWriter) -> "EchoEngine":
        args: dict[str, Any] = config.engine_args
        fault = str(args.get("fault") or os.environ.get(runtime_env.ECHO_FAULT, ""))
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
            token_delay_ms=float(args.get("token_delay_ms", 0)),
            max_active=int(args.get("max_active", 256)),
            max_frame_bytes=config.max_frame_bytes,
        )

    # -- Engine ------------------------------------------------------------------------

    def add(self, request_id: int, item: RequestItem, *, stream: bool) -> None:
        source, prompt_tokens = _source(item)
        fault = ""
        prompt = item.get("prompt", "")
        if prompt.startswith(FAULT_PREFIX):
            words = prompt[len(FAULT_PREFIX) :].split()
            fault = words[0] if words else ""
            log.warning("echo_fault fault=%s request=%d", fault, request_id)
            if fault == "bad_request":
                raise RequestError("injected bad request (echo fault)")
        params = item["params"]
        max_tokens = output_tokens(params)
        material = b"\0".join([self._model_hash, source, str(params.get("seed")).encode()])
        raw = hashlib.shake_256(material).digest(3 * max_tokens)
        token_ids = [
            int.from_bytes(raw[i : i + 3], "big") % VOCAB_SIZE for i in range(0, len(raw), 3)
        ]
        words = render(token_ids)
        finish = "length"
        stop = params.get("stop")
        if stop:
            for i in range(len(words)):
                text = " ".join(words[: i + 1])
                if any(s in text for s in stop):
                    token_ids, words, finish = token_ids[: i + 1], words[: i + 1], "stop"
                    break
        self._runs[request_id] = _Run(
            request_id, stream, token_ids, words, finish, prompt_tokens, fault
        )
        # Announced when generating slowly (tests reach "mid-request" through it); at full
        # speed a line per request would only flood the agent's runtime log.
        log.log(
            logging.INFO if self._delay_s else logging.DEBUG,
            "echo_request_received request=%d stream=%s",
            request_id,
            stream,
        )

    def abort(self, request_id: int) -> bool:
        return self._runs.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self._runs)

    def step(self) -> list[StepFrame]:
        if self._delay_s:
            time.sleep(self._delay_s)
        out: list[StepFrame] = []
        for run in list(self._runs.values()):
            out.extend(self._advance(run))
        return out

    def stats(self) -> EngineStats:
        """Echo keeps no KV cache: its `kv_cache_usage` is the share of its request slots
        in use, so the figure moves with load as a real engine's does."""
        running = len(self._runs)
        return {
            "running": running,
            "waiting": 0,
            "kv_cache_usage": min(1.0, running / self.max_active) if self.max_active else 0.0,
        }

    def close(self) -> None:
        self._runs.clear()

    # -- one request -------------------------------------------------------------------

    def _advance(self, run: _Run) -> list[StepFrame]:
        if run.fault:
            faulty = self._fault(run)
            if faulty is not None:
                return faulty
        if run.pos == 0:
            run.first_token_s = time.perf_counter() - run.added_at
        run.pos += 1
        if run.pos < len(run.token_ids):
            if not run.stream:
                return []
            return [
                frames.partial(
                    run.request_id,
                    run.token_ids[run.pos - 1 : run.pos],
                    run.text(run.pos - 1, run.pos),
                )
            ]
        del self._runs[run.request_id]
        return [self._done(run)]

    def _done(self, run: _Run) -> StepFrame:
        return frames.done(
            run.request_id,
            token_ids=run.token_ids,
            text=" ".join(run.words),
            finish_reason=run.finish_reason,
            prompt_tokens=run.prompt_tokens,
            first_token_s=run.first_token_s,
        )

    def _fault(self, run: _Run) -> list[StepFrame] | None:
        """The frames a faulty request produces this step, or None to step it normally."""
        fault, rid = run.fault, run.request_id
        if fault == "crash":
            os._exit(3)
        if fault == "hang":
            if run.pos < HANG_AFTER_TOKENS:
                return None
            log.warning("echo_fault_hanging request=%d", rid)
            while True:
                time.sleep(3600)
        if fault == "garbage":
            run.fault = ""
            self._write_raw(GARBAGE)
            return None
        del self._runs[rid]
        if fault == "oversize":
            # Written past the loop, which would turn an oversized output into that
            # request's `failed`: the agent must meet the frame itself.
            oversized = frames.done(
                rid,
                token_ids=[],
                text="x" * (self._max_frame_bytes + 1),
                finish_reason="length",
                prompt_tokens=0,
                first_token_s=0.0,
            )
            self._write_raw(frames.pack(oversized))
            return []
        if fault == "error":
            return [frames.failed(rid, FailCode.ENGINE, "injected error (echo fault)")]
        if fault == "unknown_id":
            return [frames.partial(rid + 1_000_000, [1], "x")]
        if fault == "done_twice":
            return [self._done(run), self._done(run)]
        if fault == "out_of_order":
            return [self._done(run), frames.partial(rid, [1], "x")]
        if fault == "endless":
            self._runs[rid] = run
            run.pos += 1
            return [frames.partial(rid, [run.pos % VOCAB_SIZE], " x")]
        return [frames.failed(rid, FailCode.ENGINE, f"unknown echo fault {fault!r}")]
