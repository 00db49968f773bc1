"""A runtime that answers each request as a script says: the frame fuzzer's puppet.

RST_FUZZ_PLANS names a msgpack file holding a list of plans, one per `submit`, in order;
RST_FUZZ_INDEX names a file with the index of the next plan, shared by the successive
runtime processes (the supervisor replaces this one after each protocol violation).
A plan is a map with `kind` and its arguments; `kind` says what goes back for the request.
Runs with msgpack and `schemas.frames` only.
"""

import os
import sys
import time
from typing import Any

import msgpack

from schemas import frames
from schemas.frames import TO_RUNTIME, FailCode, FrameDecoder


def next_plan() -> dict[str, Any]:
    with open(os.environ["RST_FUZZ_PLANS"], "rb") as fh:
        plans = msgpack.unpackb(fh.read(), raw=False, strict_map_key=False)
    index_path = os.environ["RST_FUZZ_INDEX"]
    with open(index_path) as f:
        index = int(f.read() or 0)
    with open(index_path + ".new", "w") as f:
        f.write(str(index + 1))
    os.replace(index_path + ".new", index_path)
    plan: dict[str, Any] = plans[index % len(plans)]
    return plan


def done_frame(request_id: int, text: str) -> dict[str, Any]:
    return dict(
        frames.done(
            request_id,
            token_ids=[len(text)],
            text=text,
            finish_reason="stop",
            prompt_tokens=1,
            first_token_s=0.0,
        )
    )


def answer(out: int, frame: dict[str, Any]) -> int | None:
    """Write what the plan says; a return value is this process's exit code."""
    plan = next_plan()
    kind = plan["kind"]
    rid = frame["id"]
    text = str(frame["request"].get("prompt", ""))
    done = done_frame(rid, text)
    if kind == "ok":
        os.write(out, frames.pack(done))
    elif kind == "stream":
        for i in range(int(plan["parts"])):
            os.write(out, frames.pack(frames.partial(rid, [], f"p{i}")))
        os.write(out, frames.pack(done))
    elif kind == "split":
        data = frames.pack(done)
        step = max(1, int(plan["step"]))
        for start in range(0, len(data), step):
            os.write(out, data[start : start + step])
            time.sleep(0.001)
    elif kind == "done_bad":
        os.write(out, frames.pack({**done, **plan["fields"]}))
    elif kind == "failed":
        os.write(out, frames.pack(frames.failed(rid, FailCode(plan["code"]), plan["reason"])))
    elif kind == "failed_bad":
        os.write(out, frames.pack({"t": "failed", "id": rid, **plan["fields"]}))
    elif kind == "done_twice":
        os.write(out, frames.pack(done) + frames.pack(done))
        time.sleep(60)
    elif kind == "partial_unasked":
        os.write(out, frames.pack(frames.partial(rid, [1], "x")))
        time.sleep(60)
    elif kind == "wrong_id":
        os.write(out, frames.pack(done_frame(rid + int(plan["delta"]), text)))
        time.sleep(60)
    elif kind == "raw":
        os.write(out, bytes(plan["data"]))
        if plan.get("exit"):
            return 3
        time.sleep(60)  # hang: the supervisor must act on what it got, or time out
    elif kind == "frame":
        os.write(out, msgpack.packb(plan["value"], use_bin_type=True))
        time.sleep(60)
    elif kind == "truncated":
        data = frames.pack(done)
        os.write(out, data[: max(1, len(data) * int(plan["percent"]) // 100 - 1)])
        if plan.get("exit"):
            return 4
        time.sleep(60)
    elif kind == "oversized":
        os.write(out, frames.pack(done_frame(rid, "x" * int(plan["size"]))))
        time.sleep(60)
    elif kind == "fatal":
        os.write(out, frames.pack(frames.fatal(str(plan["message"]))))
        return 1
    elif kind == "exit":
        return int(plan["code"])
    return None


def main() -> int:
    out = os.dup(1)
    os.dup2(2, 1)
    ready = frames.ready(
        engine="fuzz",
        engine_version="0",
        model_sha256=os.environ.get("RESULTITY_MODEL_SHA256", ""),
        device="cpu",
        max_active=1,
    )
    os.write(out, frames.pack(ready))
    decoder = FrameDecoder(TO_RUNTIME)
    while data := os.read(0, 1 << 16):
        for frame in decoder.feed(data):
            if frame["t"] == "ping":
                os.write(out, frames.pack(frames.pong(frame["id"])))
            elif frame["t"] == "shutdown":
                return 0
            elif frame["t"] == "submit":
                code = answer(out, frame)
                if code is not None:
                    return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
