"""Which models a node serves (its loadout) and when it switches between them. Pure.

The loadout is the operator's list (`RESULTITY_MODELS`, or every approved model) ∩ the
snapshot's approved models ∩ the snapshot's placement for this node, in the snapshot's
order, as far as the cache budget holds them. One runtime runs at a time, with one model
of the loadout; `Switcher` decides, from the JetStream consumer of each model, when to
load another:

- the loaded model has nothing to do (nothing pending on its consumer, nothing in
  flight here), and another model of the loadout has jobs pending that no node is pulling
  (its consumer has no waiting pull request, and delivered nothing since the last look):
  switch to the one with the most pending;
- or another model has been starved that way (pending, nobody pulling) for
  `starve_s` while the loaded one still has work: switch, so that no model of the loadout
  waits for ever behind a busy one.

Either way only after `min_residency_s` with the model loaded, and only when the same
answer came `confirmations` looks in a row (hysteresis): two models with steady traffic
do not make the node thrash.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.snapshot import ModelSpec, Snapshot


@dataclass(frozen=True, slots=True)
class Loadout:
    models: tuple[ModelSpec, ...]
    left_out: tuple[tuple[ModelSpec, str], ...] = ()
    """Approved models this node does not serve, with why."""

    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def get(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)


def choose_loadout(
    snapshot: Snapshot, wanted: Sequence[str], node_id: str, budget_bytes: int
) -> Loadout:
    """The models of `snapshot` this node serves; `wanted` empty means every one."""
    chosen: list[ModelSpec] = []
    left_out: list[tuple[ModelSpec, str]] = []
    used = 0
    for spec in snapshot.models:
        if wanted and spec.id not in wanted:
            left_out.append((spec, "not in RESULTITY_MODELS (or RESULTITY_MODEL)"))
        elif not snapshot.placed(spec.id, node_id):
            left_out.append((spec, "placed on other nodes"))
        elif used + spec.size > budget_bytes:
            left_out.append((spec, f"over the cache budget of {budget_bytes} bytes"))
        else:
            chosen.append(spec)
            used += spec.size
    return Loadout(tuple(chosen), tuple(left_out))


@dataclass(frozen=True, slots=True)
class Queue:
    """One model's JetStream consumer, as `consumer_info` reports it."""

    pending: int
    """Jobs not yet delivered to any node (`num_pending`)."""
    waiting: int
    """Pull requests waiting for jobs, from any node (`num_waiting`)."""
    delivered: int = 0
    """Deliveries so far (`delivered.consumer_seq`): when it grows, some node is pulling,
    even one too busy to have a pull request waiting."""


@dataclass(slots=True)
class Switcher:
    """Decides on-demand switches; feed it one look at a time with `observe`."""

    min_residency_s: float
    starve_s: float
    confirmations: int = 2
    loaded_at: float = 0.0
    _candidate: str | None = None
    _seen: int = 0
    _starving_since: dict[str, float] = field(default_factory=dict)
    _delivered: dict[str, int] = field(default_factory=dict)

    def loaded(self, now: float) -> None:
        """A model was (re)loaded: residency starts again."""
        self.loaded_at = now
        self._candidate, self._seen = None, 0
        self._starving_since.clear()

    def observe(
        self, now: float, loaded: str, queues: Mapping[str, Queue], in_flight: int
    ) -> str | None:
        """The model to switch to now, if any. `queues` has every loadout model's queue
        (the loaded one included, when it could be read)."""
        pulled = {
            model_id
            for model_id, q in queues.items()
            if q.waiting > 0 or q.delivered != self._delivered.get(model_id, q.delivered)
        }
        self._delivered.update((model_id, q.delivered) for model_id, q in queues.items())
        unserved = {
            model_id: q.pending
            for model_id, q in queues.items()
            if model_id != loaded and q.pending > 0 and model_id not in pulled
        }
        for model_id in list(self._starving_since):
            if model_id not in unserved:
                del self._starving_since[model_id]
        for model_id in unserved:
            self._starving_since.setdefault(model_id, now)
        mine = queues.get(loaded)
        idle = in_flight == 0 and mine is not None and mine.pending == 0
        target: str | None = None
        if unserved and idle:
            target = max(unserved, key=lambda m: (unserved[m], m))
        elif unserved:
            starved = [m for m in unserved if now - self._starving_since[m] >= self.starve_s]
            if starved:
                target = min(starved, key=lambda m: (self._starving_since[m], m))
        if target is None or target != self._candidate:
            self._candidate, self._seen = target, 1 if target is not None else 0
        else:
            self._seen += 1
        if target is None or self._seen < self.confirmations:
            return None
        if now - self.loaded_at < self.min_residency_s:
            return None
        return target
