"""The runtime's two pipes: frames in from stdin, frames out on the original stdout.

`FrameChannel.claim_stdout()` moves the real stdout aside before anything else can write
to it: fd 1 then points at stderr, so a library (or a child process) that prints only adds
to the log and can never corrupt the frame stream.
"""

import os
import sys
from collections import deque

from schemas.frames import TO_RUNTIME, Frame, FrameDecoder, pack

READ_CHUNK = 1 << 16


class EndOfInput(Exception):
    """stdin reached EOF: the agent is gone (it normally sends `shutdown`)."""


class FrameChannel:
    def __init__(self, in_fd: int, out_fd: int, *, max_frame_bytes: int) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._decoder = FrameDecoder(TO_RUNTIME, max_frame_bytes=max_frame_bytes)
        self._pending: deque[Frame] = deque()

    @classmethod
    def claim_stdio(cls, *, max_frame_bytes: int) -> "FrameChannel":
        sys.stdout.flush()
        out_fd = os.dup(1)  # not inheritable: child processes never see the frame stream
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(0, out_fd, max_frame_bytes=max_frame_bytes)

    def receive(self) -> Frame:
        """Block until the next frame; raise `FrameError` on bad input, `EndOfInput` at EOF."""
        while not self._pending:
            data = os.read(self._in_fd, READ_CHUNK)
            if not data:
                raise EndOfInput
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def send(self, frame: Frame) -> None:
        self.write_raw(pack(frame))

    def write_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._out_fd, view)
            view = view[written:]
