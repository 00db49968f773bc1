"""The runtime's two pipes: frames in from stdin (read by a thread), frames out on the
original stdout.

`FrameChannel.claim_stdio()` moves the real stdout aside before anything else can write to
it: fd 1 then points at stderr, so a library (or a child process) that prints only adds to
the log and can never corrupt the frame stream.

One reader thread decodes stdin into a queue, so the engine loop never blocks on input: it
takes what has arrived between engine steps (`poll`), and blocks (`wait`) only when the
engine is idle. A decoding error or the end of input travels through the queue too, in
order after the frames that preceded it.
"""

import os
import queue
import sys
import threading

from schemas.frames import TO_RUNTIME, Frame, FrameDecoder, FrameError, pack

READ_CHUNK = 1 << 16


class EndOfInput(Exception):
    """stdin reached EOF: the agent is gone (it normally sends `shutdown`)."""


_Item = Frame | FrameError | EndOfInput


class FrameChannel:
    def __init__(self, in_fd: int, out_fd: int, *, max_frame_bytes: int) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._decoder = FrameDecoder(TO_RUNTIME, max_frame_bytes=max_frame_bytes)
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="frame-reader", daemon=True)

    @classmethod
    def claim_stdio(cls, *, max_frame_bytes: int) -> "FrameChannel":
        sys.stdout.flush()
        out_fd = os.dup(1)  # not inheritable: child processes never see the frame stream
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(0, out_fd, max_frame_bytes=max_frame_bytes)

    def start_reader(self) -> None:
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._in_fd, READ_CHUNK)
            except OSError:
                data = b""
            if not data:
                self._inbox.put(EndOfInput())
                return
            try:
                for frame in self._decoder.feed(data):
                    self._inbox.put(frame)
            except FrameError as exc:
                self._inbox.put(exc)
                return

    def wait(self, timeout: float | None = None) -> Frame | None:
        """The next frame, blocking up to `timeout` (None: forever); None if none came.
        Raises `FrameError` on bad input and `EndOfInput` at EOF."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return self._unwrap(item)

    def poll(self) -> list[Frame]:
        """Every frame that has arrived, without blocking (stops before an error: the error
        is raised by the next call)."""
        frames: list[Frame] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return frames
            if isinstance(item, FrameError | EndOfInput):
                if frames:
                    self._requeue_error(item)
                    return frames
                raise item
            frames.append(item)

    def _requeue_error(self, exc: FrameError | EndOfInput) -> None:
        # Only the reader thread puts after its error, and it has stopped: order is kept.
        rest: list[_Item] = [exc]
        while True:
            try:
                rest.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in rest:
            self._inbox.put(item)

    @staticmethod
    def _unwrap(item: _Item) -> Frame:
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, frame: object) -> None:
        self.write_raw(pack(frame))

    def write_raw(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                written = os.write(self._out_fd, view)
                view = view[written:]
