"""A runtime that answers each batch as a script says: the frame fuzzer's puppet.

RST_FUZZ_PLANS names a msgpack file holding a list of plans, one per batch, in order;
RST_FUZZ_INDEX names a file with the index of the next plan, shared by the successive
runtime processes (the supervisor replaces this one after each protocol violation).
A plan is a map with `kind` and its arguments; `kind` says what goes back for the batch.
Runs with msgpack and `schemas.frames` only.
"""

import os
import sys
import time

import msgpack

from schemas import frames
from schemas.frames import TO_RUNTIME, FrameDecoder


def next_plan() -> dict[str, object]:
    plans = msgpack.unpackb(
        open(os.environ["RST_FUZZ_PLANS"], "rb").read(), raw=False, strict_map_key=False
    )
    index_path = os.environ["RST_FUZZ_INDEX"]
    with open(index_path) as f:
        index = int(f.read() or 0)
    with open(index_path + ".new", "w") as f:
        f.write(str(index + 1))
    os.replace(index_path + ".new", index_path)
    plan: dict[str, object] = plans[index % len(plans)]
    return plan


def ok_item(item: dict[str, object]) -> dict[str, object]:
    text = str(item.get("prompt", ""))
    return frames.ok(str(item["job_id"]), text, [len(text)], "stop", 1)


def answer(out: int, frame: dict[str, object]) -> int | None:
    """Write what the plan says; a return value is this process's exit code."""
    plan = next_plan()
    kind = plan["kind"]
    batch_id = frame["id"]
    items = list(frame["items"])  # type: ignore[call-overload]
    entries = [ok_item(i) for i in items]
    if kind == "ok":
        os.write(out, frames.pack(frames.result(batch_id, entries)))  # type: ignore[arg-type]
    elif kind == "split":
        data = frames.pack(frames.result(batch_id, entries))  # type: ignore[arg-type]
        step = max(1, int(plan["step"]))  # type: ignore[call-overload]
        for start in range(0, len(data), step):
            os.write(out, data[start : start + step])
            time.sleep(0.001)
    elif kind == "items":
        # per-item replacements: index -> entry (any msgpack value), plus extra entries
        for index, entry in plan["replace"].items():  # type: ignore[attr-defined]
            i = int(index)
            if i < len(entries):
                old = entries[i]
                entries[i] = {**old, **entry} if isinstance(old, dict) else entry
        for index in plan["drop"]:  # type: ignore[attr-defined]
            if int(index) < len(entries):
                entries[int(index)] = None
        kept = [e for e in entries if e is not None] + list(plan["extra"])  # type: ignore[call-overload]
        os.write(out, frames.pack({"t": "result", "id": batch_id, "items": kept}))
    elif kind == "items_value":
        os.write(out, frames.pack({"t": "result", "id": batch_id, "items": plan["value"]}))
    elif kind == "wrong_id":
        wrong = batch_id + int(plan["delta"])  # type: ignore[operator, call-overload]
        os.write(out, frames.pack(frames.result(wrong, entries)))
    elif kind == "raw":
        os.write(out, bytes(plan["data"]))  # type: ignore[arg-type]
        if plan.get("exit"):
            return 3
        time.sleep(60)  # hang: the supervisor must act on what it got, or time out
    elif kind == "frame":
        os.write(out, msgpack.packb(plan["value"], use_bin_type=True))
        time.sleep(60)
    elif kind == "truncated":
        data = frames.pack(frames.result(batch_id, entries))  # type: ignore[arg-type]
        os.write(out, data[: max(1, len(data) * int(plan["percent"]) // 100 - 1)])  # type: ignore[call-overload]
        if plan.get("exit"):
            return 4
        time.sleep(60)
    elif kind == "oversized":
        big = "x" * int(plan["size"])  # type: ignore[call-overload]
        os.write(out, frames.pack(frames.result(batch_id, [frames.ok("a", big, [1], "stop", 1)])))
        time.sleep(60)
    elif kind == "fatal":
        os.write(out, frames.pack(frames.fatal(str(plan["message"]))))
        return 1
    elif kind == "exit":
        return int(plan["code"])  # type: ignore[call-overload]
    return None


def main() -> int:
    out = os.dup(1)
    os.dup2(2, 1)
    ready = frames.ready(
        engine="fuzz",
        engine_version="0",
        model_sha256=os.environ.get("RESULTITY_MODEL_SHA256", ""),
        device="cpu",
    )
    os.write(out, frames.pack(ready))
    decoder = FrameDecoder(TO_RUNTIME)
    while data := os.read(0, 1 << 16):
        for frame in decoder.feed(data):
            if frame["t"] == "ping":
                os.write(out, frames.pack(frames.pong(frame["id"])))
            elif frame["t"] == "shutdown":
                return 0
            elif frame["t"] == "batch":
                code = answer(out, frame)
                if code is not None:
                    return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
