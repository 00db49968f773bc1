"""Garbage-collector settings for a serving process.

A node holds up to `max_in_flight` jobs at once, each a few dozen container objects (the
job, its futures, frames, result fields) that live as long as the job runs. Under
CPython's default thresholds (700, 10, 10) they outlive the young collections, are promoted,
and every few thousand jobs trigger a full collection that walks the whole heap: the
modules, pydantic schemas and Docker client loaded at start, tens of milliseconds each.
Measured in `python -m bench.throughput` (echo runtime, 20,000 jobs): about 20 µs of the
agent's 135 µs of CPU per job went to the collector; with these settings, 6.

- `gc.freeze()` once started: everything alive then (code, schemas, clients) moves to the
  permanent generation, which no collection walks again;
- the young generation is collected every `YOUNG_THRESHOLD` net allocations instead of 700:
  at a few thousand jobs/s that is a few times a second, each pass a few milliseconds.

Reference cycles made while serving are still collected and refcounting frees everything
else as before; a cycle that was alive at the freeze and is dropped later is not (a
one-time, bounded cost: the objects of the start);
`python -m bench.memory` shows the agent's memory flat over 300,000 jobs with them.
"""

import gc
import logging

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
OLDER_THRESHOLDS = (10, 10)


def tune_for_serving() -> None:
    """Call once the process has started what it keeps (connections, runtime, pipeline)
    and before it serves; never in a process that creates and drops such things over and
    over (a test run): what is frozen is never examined for cycles again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    log.info("gc_tuned frozen=%d threshold=%s", gc.get_freeze_count(), gc.get_threshold())
