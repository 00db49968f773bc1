"""The runtime process: load the engine, say `ready`, then run requests until `shutdown`.

The engine loop: take every frame that has arrived (blocking only while the engine is
idle), answer pings at once, start and abort requests, fail those past their deadline, then
run one engine step and send what it produced. A reader thread feeds the frames, so a
long input never stalls generation and pings are answered between any two steps.

Exit status: 0 after `shutdown` or end of input (requests submitted before the end of input
are answered first), 1 after a `fatal` (bad input frame, engine failure), 2 when the engine
could not load.
"""

import logging
import sys
import time

from containers.runtime.channel import EndOfInput, FrameChannel
from containers.runtime.config import ConfigError, RuntimeConfig
from containers.runtime.engines import Engine, EngineError, StepFrame, load_engine
from containers.runtime.request import RequestError
from schemas import frames
from schemas.frames import EngineStats, FailCode, Frame, FrameError, FrameKind
from schemas.limits import MAX_FRAME_BYTES

log = logging.getLogger("containers.runtime")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class Loop:
    """The engine loop over one channel (see the module docstring)."""

    def __init__(
        self, channel: FrameChannel, engine: Engine, *, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        self._channel = channel
        self._engine = engine
        self._max_frame_bytes = max_frame_bytes
        self._deadlines: dict[int, float] = {}
        self._active: set[int] = set()

    def serve(self) -> int:
        """Run until `shutdown` (requests still running are dropped: the agent has given
        them up) or the end of input (requests still running are finished first)."""
        ended = False
        while True:
            incoming: list[Frame] = []
            if not self._active:
                if ended:
                    log.info("runtime_end_of_input")
                    return 0
                first = self._channel.wait()  # raises EndOfInput when idle at EOF
                incoming = [first] if first is not None else []
            elif not ended:
                try:
                    incoming = self._channel.poll()
                except EndOfInput:
                    ended = True
            for frame in incoming:
                if not self._handle(frame):
                    return 0
            self._expire()
            if self._active:
                for out in self._engine.step():
                    self._output(out)

    def _output(self, out: StepFrame) -> None:
        """Send one request's output. A frame over the agent's limit would break the whole
        runtime there: that request fails alone (`bad_request`: it asked for more output
        than a frame carries) and is stopped in the engine."""
        request_id = out["id"]
        data = frames.pack(out)
        if len(data) > self._max_frame_bytes:
            log.warning(
                "runtime_output_too_large request=%d bytes=%d limit=%d",
                request_id,
                len(data),
                self._max_frame_bytes,
            )
            if out["t"] == "partial":
                self._engine.abort(request_id)
            self._finished(request_id)
            reason = (
                f"output of {len(data)} bytes is over the frame limit of "
                f"{self._max_frame_bytes}: ask for fewer tokens or logprobs"
            )
            self._channel.send(frames.failed(request_id, FailCode.BAD_REQUEST, reason))
            return
        if out["t"] != "partial":
            self._finished(request_id)
        self._channel.write_raw(data)

    def _handle(self, frame: Frame) -> bool:
        """Act on one frame; False on `shutdown`."""
        kind = frame["t"]
        if kind == FrameKind.PING:
            self._channel.send(frames.pong(frames.parse_ping(frame)["id"], self._stats()))
        elif kind == FrameKind.SUBMIT:
            self._submit(frame)
        elif kind == FrameKind.ABORT:
            request_id = frames.parse_abort(frame)["id"]
            if request_id in self._active and self._engine.abort(request_id):
                self._finished(request_id)
                self._channel.send(frames.failed(request_id, FailCode.ABORTED, "aborted"))
        elif kind == FrameKind.SHUTDOWN:
            log.info("runtime_shutdown")
            return False
        return True

    def _stats(self) -> EngineStats | None:
        """The engine's figures for a `pong`; a failure to read them costs the figures,
        never the pong (the agent would take the runtime for hung)."""
        try:
            return self._engine.stats()
        except Exception:
            log.warning("runtime_stats_failed", exc_info=True)
            return None

    def _submit(self, frame: Frame) -> None:
        submit = frames.parse_submit(frame)
        request_id = submit["id"]
        if request_id in self._active:
            raise FrameError(f"submit for request {request_id}, which is running")
        try:
            item = frames.parse_request_item(submit["request"])
        except FrameError as exc:
            self._channel.send(frames.failed(request_id, FailCode.BAD_REQUEST, str(exc)))
            return
        deadline = submit["deadline"]
        if deadline is not None and deadline <= time.time():
            self._channel.send(frames.failed(request_id, FailCode.DEADLINE, "deadline passed"))
            return
        try:
            self._engine.add(request_id, item, stream=submit["stream"])
        except RequestError as exc:
            self._channel.send(frames.failed(request_id, FailCode.BAD_REQUEST, str(exc)))
            return
        self._active.add(request_id)
        if deadline is not None:
            self._deadlines[request_id] = deadline

    def _expire(self) -> None:
        if not self._deadlines:
            return
        now = time.time()
        for request_id, deadline in list(self._deadlines.items()):
            if deadline <= now and self._engine.abort(request_id):
                self._finished(request_id)
                self._channel.send(
                    frames.failed(request_id, FailCode.DEADLINE, "deadline passed while running")
                )

    def _finished(self, request_id: int) -> None:
        self._active.discard(request_id)
        self._deadlines.pop(request_id, None)


def main() -> int:
    _setup_logging()
    try:
        config = RuntimeConfig.from_env()
    except ConfigError as exc:
        channel = FrameChannel.claim_stdio(max_frame_bytes=MAX_FRAME_BYTES)
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
    channel.start_reader()
    channel.send(
        frames.ready(
            engine=engine.name,
            engine_version=engine.version,
            model_sha256=engine.model_sha256,
            device=engine.device,
            max_active=engine.max_active,
            devices=engine.devices,
        )
    )
    log.info(
        "runtime_ready engine=%s version=%s device=%s max_active=%d",
        engine.name,
        engine.version,
        engine.device,
        engine.max_active,
    )
    try:
        status = Loop(channel, engine, max_frame_bytes=config.max_frame_bytes).serve()
    except EndOfInput:
        log.info("runtime_end_of_input")
        status = 0
    except FrameError as exc:
        log.error("runtime_bad_input error=%s", exc)
        channel.send(frames.fatal(f"bad input frame: {exc}"))
        return 1
    except Exception as exc:
        log.exception("runtime_engine_failed")
        channel.send(frames.fatal(f"engine failed: {type(exc).__name__}: {exc}"))
        return 1
    _close(engine)
    return status


def _close(engine: Engine) -> None:
    try:
        engine.close()
    except Exception:
        log.exception("runtime_close_failed engine=%s", engine.name)
