"""The runtime process: load the engine, say `ready`, then answer frames until `shutdown`.

Exit status: 0 after `shutdown` or end of input, 1 after a `fatal` (bad input frame,
engine failure), 2 when the engine could not load.
"""

import logging
import sys
import time

from containers.runtime.channel import EndOfInput, FrameChannel
from containers.runtime.config import ConfigError, RuntimeConfig
from containers.runtime.engines import Engine, EngineError, load_engine
from containers.runtime.request import RequestError, parse_request
from schemas import frames
from schemas.frames import Frame, FrameError

log = logging.getLogger("containers.runtime")


class ProtocolError(ValueError):
    """A well-formed frame whose content breaks the protocol (for example, no job ids)."""


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run_batch(engine: Engine, frame: Frame) -> Frame:
    """All valid items go through the engine in one call; invalid ones fail alone."""
    batch_id = frame.get("id")
    items = frame.get("items")
    if not isinstance(batch_id, int) or not isinstance(items, list):
        raise ProtocolError("batch frame needs an integer id and a list of items")
    outcomes: list[Frame | None] = []
    requests = []
    for item in items:
        job_id = item.get("job_id") if isinstance(item, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise ProtocolError(f"batch {batch_id} holds an item without a job_id")
        try:
            requests.append(parse_request(job_id, item))
            outcomes.append(None)
        except RequestError as exc:
            outcomes.append(frames.failed(job_id, f"bad request: {exc}"))
    started = time.perf_counter()
    produced = iter(engine.generate(requests) if requests else [])
    log.info(
        "batch_done id=%d items=%d engine_s=%.4f",
        batch_id,
        len(items),
        time.perf_counter() - started,
    )
    return frames.result(batch_id, [o if o is not None else next(produced) for o in outcomes])


def serve(channel: FrameChannel, engine: Engine) -> int:
    while True:
        try:
            frame = channel.receive()
        except EndOfInput:
            log.info("runtime_end_of_input")
            return 0
        kind = frame["t"]
        if kind == "batch":
            started = time.perf_counter()
            channel.send(run_batch(engine, frame))
            log.debug(
                "batch_done batch_id=%s items=%d ms=%.1f",
                frame.get("id"),
                len(frame.get("items") or []),
                (time.perf_counter() - started) * 1000,
            )
        elif kind == "ping":
            channel.send(frames.pong(frame.get("id", 0)))
        elif kind == "shutdown":
            log.info("runtime_shutdown")
            return 0


def main() -> int:
    _setup_logging()
    try:
        config = RuntimeConfig.from_env()
    except ConfigError as exc:
        channel = FrameChannel.claim_stdio(max_frame_bytes=frames.MAX_FRAME_BYTES)
        channel.send(frames.fatal(str(exc)))
        return 2
    channel = FrameChannel.claim_stdio(max_frame_bytes=config.max_frame_bytes)
    log.info("runtime_starting engine=%s model_dir=%s", config.engine, config.model_dir)
    try:
        engine = load_engine(config, channel.write_raw)
    except Exception as exc:
        log.exception("runtime_load_failed engine=%s", config.engine)
        reason = exc if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        channel.send(frames.fatal(f"engine {config.engine} failed to load: {reason}"))
        return 2
    channel.send(
        frames.ready(
            engine=engine.name,
            engine_version=engine.version,
            model_sha256=engine.model_sha256,
            device=engine.device,
        )
    )
    log.info(
        "runtime_ready engine=%s version=%s device=%s", engine.name, engine.version, engine.device
    )
    try:
        status = serve(channel, engine)
    except (FrameError, ProtocolError) as exc:
        log.error("runtime_bad_input error=%s", exc)
        message = f"bad input frame: {exc}"
    except Exception as exc:
        log.exception("runtime_engine_failed")
        message = f"engine failed: {type(exc).__name__}: {exc}"
    else:
        _close(engine)
        return status
    channel.send(frames.fatal(message))
    return 1


def _close(engine: Engine) -> None:
    try:
        engine.close()
    except Exception:
        log.exception("runtime_close_failed engine=%s", engine.name)
