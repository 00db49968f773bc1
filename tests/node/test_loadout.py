"""The loadout and the on-demand switch policy (worker/node/loadout.py): pure, no server."""

import pytest

from schemas.snapshot import Snapshot
from tests.support.payloads import snapshot as snapshot_body
from worker.node.loadout import Queue, Switcher, choose_loadout

NODE = "a" * 64
OTHER_NODE = "b" * 64
BIG = 1 << 40


def snapshot(**over: object) -> Snapshot:
    return Snapshot.model_validate(snapshot_body() | over)


def test_default_loadout_is_every_approved_model() -> None:
    assert choose_loadout(snapshot(), (), NODE, BIG).ids() == ["tiny", "other"]


def test_the_operators_list_narrows_it() -> None:
    chosen = choose_loadout(snapshot(), ("other", "unknown"), NODE, BIG)
    assert chosen.ids() == ["other"]
    assert [(m.id, why) for m, why in chosen.left_out] == [
        ("tiny", "not in RESULTITY_MODELS (or RESULTITY_MODEL)")
    ]


def test_placement_steers_models_to_nodes() -> None:
    placed = snapshot(placement={"tiny": [OTHER_NODE], "other": ["*"]})
    assert choose_loadout(placed, (), NODE, BIG).ids() == ["other"]
    assert choose_loadout(placed, (), OTHER_NODE, BIG).ids() == ["tiny", "other"]


def test_the_cache_budget_keeps_what_fits_in_snapshot_order() -> None:
    s = snapshot()
    size = s.models[0].size
    chosen = choose_loadout(s, (), NODE, size)
    assert chosen.ids() == ["tiny"]
    assert "over the cache budget" in chosen.left_out[0][1]


def test_placement_names_node_ids_or_any() -> None:
    with pytest.raises(ValueError):
        snapshot(placement={"tiny": ["not-a-node"]})


def q(pending: int = 0, waiting: int = 0, delivered: int = 0) -> Queue:
    return Queue(pending, waiting, delivered)


def switcher(**over: float) -> Switcher:
    values = {"min_residency_s": 10.0, "starve_s": 30.0} | over
    return Switcher(min_residency_s=values["min_residency_s"], starve_s=values["starve_s"])


def test_an_idle_model_gives_way_to_one_nobody_serves_after_confirmation() -> None:
    s = switcher()
    queues = {"a": q(), "b": q(pending=5)}
    assert s.observe(20.0, "a", queues, in_flight=0) is None, "first look: not confirmed"
    assert s.observe(22.0, "a", queues, in_flight=0) == "b"


def test_no_switch_before_the_minimum_residency() -> None:
    s = switcher()
    s.loaded(100.0)
    queues = {"a": q(), "b": q(pending=5)}
    assert s.observe(101.0, "a", queues, in_flight=0) is None
    assert s.observe(105.0, "a", queues, in_flight=0) is None
    assert s.observe(110.0, "a", queues, in_flight=0) == "b"


@pytest.mark.parametrize(
    ("queues", "in_flight", "why"),
    [
        ({"a": q(pending=1), "b": q(pending=5)}, 0, "the loaded model has work queued"),
        ({"a": q(), "b": q(pending=5)}, 1, "a job is in flight here"),
        ({"a": q(), "b": q(pending=5, waiting=2)}, 0, "another node pulls b"),
        ({"a": q(), "b": q()}, 0, "nothing waits for b"),
        ({"b": q(pending=5)}, 0, "the loaded model's queue could not be read"),
    ],
)
def test_no_switch_when(queues: dict[str, Queue], in_flight: int, why: str) -> None:
    s = switcher()
    for t in (20.0, 22.0, 24.0):
        assert s.observe(t, "a", queues, in_flight) is None, why


def test_the_busiest_unserved_model_wins() -> None:
    s = switcher()
    queues = {"a": q(), "b": q(pending=2), "c": q(pending=9)}
    s.observe(20.0, "a", queues, 0)
    assert s.observe(21.0, "a", queues, 0) == "c"


def test_a_starved_model_gets_its_turn_even_while_the_loaded_one_is_busy() -> None:
    s = switcher(starve_s=30.0)
    queues = {"a": q(pending=100), "b": q(pending=1)}
    assert s.observe(20.0, "a", queues, in_flight=4) is None
    assert s.observe(40.0, "a", queues, in_flight=4) is None, "not starved for 30 s yet"
    assert s.observe(50.0, "a", queues, in_flight=4) is None, "starved: to be confirmed"
    assert s.observe(52.0, "a", queues, in_flight=4) == "b"


def test_a_candidate_that_changes_starts_the_confirmation_again() -> None:
    s = switcher()
    s.observe(20.0, "a", {"a": q(), "b": q(pending=5)}, 0)
    assert s.observe(21.0, "a", {"a": q(), "c": q(pending=5)}, 0) is None
    assert s.observe(22.0, "a", {"a": q(), "c": q(pending=5)}, 0) == "c"


def test_steady_traffic_on_both_never_thrashes() -> None:
    """Both models always have work: the node stays with the loaded one until the other
    has starved for `starve_s`, then stays `min_residency_s` at least: a bounded number of
    switches per unit of time."""
    s = switcher(min_residency_s=10.0, starve_s=30.0)
    loaded, switches, now = "a", 0, 0.0
    s.loaded(now)
    while now < 600.0:
        queues = {"a": q(pending=50), "b": q(pending=50)}
        target = s.observe(now, loaded, queues, in_flight=8)
        if target is not None:
            loaded, switches = target, switches + 1
            s.loaded(now)
        now += 2.0
    assert 0 < switches <= 600 // 30


def test_a_model_another_node_is_busy_pulling_is_not_starved() -> None:
    """A busy puller has no pull request waiting, but its deliveries grow: served."""
    s = switcher(starve_s=4.0)
    for i, t in enumerate((20.0, 22.0, 24.0, 26.0, 28.0)):
        queues = {"a": q(), "b": q(pending=500, delivered=100 * i)}
        assert s.observe(t, "a", queues, in_flight=0) is None


def test_a_model_whose_puller_stopped_is_unserved_again() -> None:
    s = switcher()
    s.observe(20.0, "a", {"a": q(), "b": q(pending=5, delivered=7)}, 0)
    s.observe(21.0, "a", {"a": q(), "b": q(pending=5, delivered=9)}, 0)
    assert s.observe(22.0, "a", {"a": q(), "b": q(pending=5, delivered=9)}, 0) is None
    assert s.observe(23.0, "a", {"a": q(), "b": q(pending=5, delivered=9)}, 0) == "b"
