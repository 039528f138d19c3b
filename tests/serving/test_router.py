"""Routing policies over plain load snapshots (no Ray)."""

from __future__ import annotations

from collections import Counter

import pytest

from dilaserve.serving.router import PowerOfTwoRouter, ReplicaLoad, RoundRobinRouter, SlackRouter, make_router


def loads(*finish_s: float, in_flight: tuple[int, ...] | None = None) -> list[ReplicaLoad]:
    in_flight = in_flight or (0,) * len(finish_s)
    return [ReplicaLoad(f"r{i}", f, n) for i, (f, n) in enumerate(zip(finish_s, in_flight))]


def test_slack_picks_the_replica_with_most_slack():
    assert SlackRouter().choose(loads(3.0, 0.5, 2.0), budget_s=1.0).name == "r1"


def test_slack_prefers_most_slack_even_when_none_meets_the_budget():
    assert SlackRouter().choose(loads(9.0, 5.0, 7.0), budget_s=1.0).name == "r1"


def test_slack_breaks_near_ties_by_requests_in_flight():
    chosen = SlackRouter(tie_s=0.01).choose(loads(1.0, 1.005, 3.0, in_flight=(4, 1, 0)), budget_s=2.0)
    assert chosen.name == "r1"


def test_slack_treats_missing_predictions_as_last_resort():
    candidates = [ReplicaLoad("a", None), ReplicaLoad("b", 4.0)]
    assert SlackRouter().choose(candidates, budget_s=1.0).name == "b"


def test_slack_sends_a_fresh_idle_replica_a_request_it_predicts_on_time():
    """A new replica prices steps from a (pessimistic) prior: by slack alone it would lose to a
    busy, measured replica forever and never calibrate."""
    busy = ReplicaLoad("old", 1.0, 3)
    fresh = ReplicaLoad("new", 4.0, 0, is_calibrated=False)
    assert SlackRouter().choose([busy, fresh], budget_s=5.0).name == "new"
    # ...but not a request its prediction says would be late,
    assert SlackRouter().choose([busy, fresh], budget_s=3.0).name == "old"
    # ...nor a second one before the first is back (then slack decides),
    assert SlackRouter().choose([busy, ReplicaLoad("new", 4.0, 1, is_calibrated=False)], budget_s=5.0).name == "old"
    # ...and a calibrated idle replica is judged by slack as before.
    assert SlackRouter().choose([busy, ReplicaLoad("new", 4.0, 0)], budget_s=5.0).name == "old"


def test_round_robin_cycles_in_name_order():
    router = RoundRobinRouter()
    picks = [router.choose(loads(1, 1, 1)).name for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_power_of_two_prefers_the_less_loaded_of_two_and_spreads_load():
    router = PowerOfTwoRouter(seed=3)
    candidates = loads(0, 0, 0, in_flight=(10, 0, 10))
    picks = Counter(router.choose(candidates).name for _ in range(200))
    # r1 wins whenever it is sampled (2 of 3 pairs); the others only against each other.
    assert picks["r1"] > 100 and picks["r0"] + picks["r2"] > 0


def test_single_candidate_and_empty():
    for policy in ("slack", "round_robin", "power_of_two"):
        router = make_router(policy)
        assert router.choose(loads(1.0), 1.0).name == "r0"
        with pytest.raises(ValueError):
            router.choose([], 1.0)
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("random")


def test_router_module_imports_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys; import dilaserve.serving.router, dilaserve.serving.admission; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
