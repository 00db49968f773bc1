"""A runtime driven over its stdin/stdout pipes, as the tests of the runtime process use it."""

import os
import select
import subprocess
import time

from schemas import frames
from schemas.frames import TO_AGENT, Frame, FrameDecoder


class FramePipe:
    """Frames to a child process's stdin, frames back from its stdout."""

    def __init__(self, proc: "subprocess.Popen[bytes]", *, max_frame_bytes: int) -> None:
        self.proc = proc
        self.decoder = FrameDecoder(TO_AGENT, max_frame_bytes=max_frame_bytes)
        self.pending: list[Frame] = []

    def send(self, frame: Frame) -> None:
        self.send_raw(frames.pack(frame))

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def receive(self, timeout: float = 10.0) -> Frame:
        """The next frame; `TimeoutError` if none comes, `EOFError` if stdout closes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no frame from the runtime")
            data = os.read(fd, 1 << 20)
            if not data:
                raise EOFError("runtime closed stdout")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)
