"""Runtime frames: the msgpack stream between the agent and the runtime container.

Imported inside the runtime image, so it depends on msgpack and the standard library only.
Each direction is a stream of msgpack maps with a type key `t`:

    runtime -> agent   ready, result, pong, fatal
    agent -> runtime   batch, ping, shutdown

`shutdown` is the explicit end of input (closing stdin over Docker's attach API is not
reliable). A map with an unknown `t`, a value that is not a map, or a frame larger than
`MAX_FRAME_BYTES` means the peer is broken: `FrameDecoder` raises `FrameError`.
"""

from collections.abc import Iterator
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 << 20

TO_RUNTIME = frozenset({"batch", "ping", "shutdown"})
TO_AGENT = frozenset({"ready", "result", "pong", "fatal"})

Frame = dict[str, Any]


class FrameError(ValueError):
    """The byte stream is not a valid frame sequence (garbage, oversized, unknown type)."""


def pack(frame: Frame) -> bytes:
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


def ready(*, engine: str, engine_version: str, model_sha256: str, device: str) -> Frame:
    return {
        "t": "ready",
        "proto": PROTOCOL_VERSION,
        "engine": engine,
        "engine_version": engine_version,
        "model_sha256": model_sha256,
        "device": device,
    }


def batch(batch_id: int, items: list[Frame]) -> Frame:
    """`items`: maps of `job_id`, `prompt` or `prompt_token_ids`, and `params`."""
    return {"t": "batch", "id": batch_id, "items": items}


def ok(
    job_id: str, text: str, token_ids: list[int], finish_reason: str, prompt_tokens: int
) -> Frame:
    return {
        "job_id": job_id,
        "text": text,
        "token_ids": token_ids,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
    }


def failed(job_id: str, message: str) -> Frame:
    return {"job_id": job_id, "error": message}


def result(batch_id: int, items: list[Frame]) -> Frame:
    return {"t": "result", "id": batch_id, "items": items}


def ping(ping_id: int) -> Frame:
    return {"t": "ping", "id": ping_id}


def pong(ping_id: int) -> Frame:
    return {"t": "pong", "id": ping_id}


def shutdown() -> Frame:
    return {"t": "shutdown"}


def fatal(message: str) -> Frame:
    return {"t": "fatal", "message": message}


class FrameDecoder:
    """Incremental decoder: `feed()` bytes as they arrive, get complete frames back."""

    def __init__(self, allowed: frozenset[str], *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._allowed = allowed
        self._max = max_frame_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=True, max_buffer_size=max_frame_bytes
        )

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        step = max(1, self._max // 2)
        for start in range(0, len(view), step):
            try:
                self._unpacker.feed(view[start : start + step])
            except msgpack.BufferFull as exc:
                raise FrameError(f"frame larger than {self._max} bytes") from exc
            frames.extend(self._drain())
        return frames

    def _drain(self) -> Iterator[Frame]:
        while True:
            try:
                value = next(self._unpacker)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise FrameError("frame holds a string that is not UTF-8") from exc
            except Exception as exc:
                raise FrameError(f"not a msgpack frame ({type(exc).__name__}: {exc})") from exc
            yield self._check(value)

    def _check(self, value: Any) -> Frame:
        if not isinstance(value, dict):
            raise FrameError(f"expected a frame map, got {type(value).__name__}: {value!r:.60}")
        kind = value.get("t")
        if kind not in self._allowed:
            raise FrameError(f"unexpected frame type {kind!r}")
        return value
