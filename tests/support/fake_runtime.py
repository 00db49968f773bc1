"""A broken runtime for the supervisor tests, for what the echo engine cannot inject.

RST_FAKE_MODE=fatal     say `ready`, then answer the first request with a `fatal` frame, exit 1
RST_FAKE_MODE=badproto  say `ready` with a frame protocol version nobody speaks
RST_FAKE_MODE=deaf      say `ready`, then never read stdin again (the agent's writes block)
RST_FAKE_MODE=flood     before `ready`, write one 32 MiB frame (and 1 MiB of stderr), then
                        never read stdin: the pipes fill and nobody is left to drain them
Runs with msgpack and `schemas.frames` only, inside the test image or as a local process.
"""

import os
import sys
import time

from schemas import frames
from schemas.frames import TO_RUNTIME, FrameDecoder

FLOOD_BYTES = 32 << 20


def main() -> int:
    mode = os.environ.get("RST_FAKE_MODE", "fatal")
    out = os.dup(1)
    os.dup2(2, 1)
    ready = dict(
        frames.ready(
            engine="fake",
            engine_version="0",
            model_sha256=os.environ.get("RESULTITY_MODEL_SHA256", ""),
            device="cpu",
            max_active=8,
        )
    )
    if mode == "flood":
        sys.stderr.write("fake runtime: flooding\n" + "x" * (1 << 20) + "\n")
        sys.stderr.flush()
        os.write(out, frames.pack({"t": "ready", "junk": "y" * FLOOD_BYTES}))
        while True:
            time.sleep(3600)
    if mode == "badproto":
        ready["proto"] = 99
    os.write(out, frames.pack(ready))
    if mode == "deaf":
        sys.stderr.write("fake runtime: deaf from now on\n")
        while True:
            time.sleep(3600)
    decoder = FrameDecoder(TO_RUNTIME)
    while data := os.read(0, 65536):
        for frame in decoder.feed(data):
            if frame["t"] == "ping":
                os.write(out, frames.pack(frames.pong(frame["id"])))
            elif frame["t"] == "shutdown":
                return 0
            elif frame["t"] == "submit":
                sys.stderr.write("fake runtime: giving up on this request\n")
                os.write(out, frames.pack(frames.fatal("fake engine lost its mind")))
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
