"""The controller's decisions, without Ray: hysteresis, the order of a reconfiguration, drains
before removals, threshold-only changes pushed live, and reconciling half-done work."""

from __future__ import annotations

import pytest

from dilaserve.controller.actions import (
    AwaitDrained, AwaitReady, DrainReplica, RouteReplica, SetPolicy, StartReplica, StopReplica, UnrouteReplica,
)
from dilaserve.controller.decision import ControllerState, decide, diff, next_names, plan_trigger
from dilaserve.controller.observation import FAILED, MISSING, READY, STARTING, LoadEstimate

from controller_helpers import LENGTHS, VARIANTS, make_config, make_planning, replica, view

NOW = 1000.0


def load(rate: float | None, attainment: float | None = 1.0) -> LoadEstimate:
    return LoadEstimate(rate, attainment, LENGTHS, 10.0)


def planned(at: float = NOW - 5, rate: float = 1.0, reconfigured: float | None = None) -> ControllerState:
    return ControllerState(last_plan_s=at, planned_rate_rps=rate, last_reconfig_s=reconfigured, last_lengths=LENGTHS)


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_scale_up_starts_waits_and_routes_before_anything_else():
    d = decide(NOW, view(replica("cpu-0")), load(2.0), ControllerState(), make_config(), make_planning(), VARIANTS)
    assert d.kind == "reconfigure" and d.has_planned
    assert d.target == ((1, 0.9, None, 2),)
    assert d.actions == (StartReplica("cpu-1", "cpu", 0.9), AwaitReady(("cpu-1",)), RouteReplica("cpu-1"))


def test_unchanged_load_does_not_replan_before_the_period():
    config = make_config()
    state = planned(rate=2.0)
    d = decide(NOW, view(replica("cpu-0"), replica("cpu-1")), load(2.2), state, config, make_planning(), VARIANTS)
    assert d.kind == "idle" and not d.has_planned and not d.actions
    assert plan_trigger(state.last_plan_s + config.period_s, load(2.2), state, config).startswith("period")
    assert plan_trigger(NOW, load(2.6), state, config).startswith("rate moved")


def test_a_plan_that_is_not_better_enough_is_not_applied():
    # At 1.0 req/s one replica at 0.9 serves everything; at 1.05 the planner would pick 0.7 on
    # one replica (same GPUs, a little less accurate): no reason to switch.
    state = planned(at=NOW - 100, rate=1.0)
    d = decide(NOW, view(replica("cpu-0")), load(1.05), state, make_config(), make_planning(gpus=1), VARIANTS)
    assert d.kind == "hold" and d.has_planned and not d.actions


def test_min_interval_holds_a_shrink_and_asks_again_next_tick():
    two = view(replica("cpu-0"), replica("cpu-1"))
    state = planned(at=NOW - 100, rate=2.0, reconfigured=NOW - 5)
    d = decide(NOW, two, load(0.2), state, make_config(min_interval_s=20), make_planning(), VARIANTS)
    assert d.kind == "hold" and "ago" in d.reason and not d.actions
    assert not d.has_planned  # not recorded: the next tick asks again
    later = decide(NOW + 15, two, load(0.2), state, make_config(min_interval_s=20), make_planning(), VARIANTS)
    assert later.kind == "reconfigure" and isinstance(later.actions[0], DrainReplica)


def test_min_interval_never_holds_back_serving_more():
    state = planned(at=NOW - 100, rate=1.0, reconfigured=NOW - 5)
    d = decide(NOW, view(replica("cpu-0")), load(3.0), state, make_config(min_interval_s=20), make_planning(),
               VARIANTS)
    assert d.kind == "reconfigure" and "more of the traffic" in d.reason


def test_a_small_dip_does_not_shrink_the_cluster_thanks_to_headroom():
    # Two replicas at 0.9 for 2.2 req/s. At 1.9 req/s one replica at 0.7 would do (capacity
    # ~2.0); with 20% headroom the planner prices 2.28 req/s, which needs two: keep them.
    two = view(replica("cpu-0"), replica("cpu-1"))
    state = planned(at=NOW - 100, rate=2.2)
    d = decide(NOW, two, load(1.9), state, make_config(headroom=0.2), make_planning(), VARIANTS)
    assert d.kind == "hold" and not d.actions, d.reason
    # Without headroom the same dip shrinks it (and lowers the threshold of the one kept).
    d = decide(NOW, two, load(1.9), state, make_config(headroom=0.0), make_planning(), VARIANTS)
    assert d.actions == (SetPolicy("cpu-0", 0.7), DrainReplica("cpu-1"), AwaitDrained(("cpu-1",)),
                         StopReplica("cpu-1"))


def test_scale_down_drains_before_it_stops():
    two = view(replica("cpu-0"), replica("cpu-1"))
    d = decide(NOW, two, load(0.2), planned(at=NOW - 100, rate=2.0), make_config(), make_planning(), VARIANTS)
    assert d.kind == "reconfigure"
    assert d.actions == (DrainReplica("cpu-1"), AwaitDrained(("cpu-1",)), StopReplica("cpu-1"))


def test_threshold_only_change_is_a_live_push_without_restart():
    # One GPU, 1.5 req/s: the same replica at 0.7 serves it all; at 0.9 it cannot.
    d = decide(NOW, view(replica("cpu-0")), load(1.5), planned(at=NOW - 100), make_config(gpus=1),
               make_planning(gpus=1), VARIANTS)
    assert d.kind == "reconfigure"
    assert d.actions == (SetPolicy("cpu-0", 0.7),)


def test_changing_degree_starts_new_variants_before_draining_old_ones():
    old = [replica("cpu-0"), replica("cpu-1")]
    actions = diff(old, {(2, 0.9, None): 1}, VARIANTS, {"cpu-0", "cpu-1"})
    assert kinds(actions) == ["StartReplica", "AwaitReady", "RouteReplica", "DrainReplica", "DrainReplica",
                              "AwaitDrained", "StopReplica", "StopReplica"]
    assert actions[0] == StartReplica("tp2-0", "tp2", 0.9)


def test_diff_keeps_exact_matches_and_repurposes_same_degree_replicas():
    old = [replica("cpu-0", 0.9), replica("cpu-1", 0.5), replica("cpu-3", 0.9)]
    actions = diff(old, {(1, 0.9, None): 2, (1, 0.7, None): 2}, VARIANTS, {"cpu-0", "cpu-1", "cpu-3"})
    assert actions == [StartReplica("cpu-4", "cpu", 0.7), AwaitReady(("cpu-4",)), RouteReplica("cpu-4"),
                       SetPolicy("cpu-1", 0.7)]


def test_replicas_of_the_main_application_are_kept_and_matched_first():
    pinned = replica("cpu-0", 0.9, is_removable=False)
    own = replica("cpu-1", 0.9)
    assert diff([own, pinned], {(1, 0.9, None): 1}, VARIANTS, {"cpu-0", "cpu-1"}) == [
        DrainReplica("cpu-1"), AwaitDrained(("cpu-1",)), StopReplica("cpu-1")]
    assert diff([pinned], {}, VARIANTS, {"cpu-0"}) == []


def test_new_names_follow_every_index_in_use():
    assert next_names("cpu", {"cpu-0", "cpu-7", "tp2-9", "cpu-x"}, 2) == ["cpu-8", "cpu-9"]
    assert next_names("a-b", set(), 1) == ["a-b-0"]


def test_warm_floor_without_traffic():
    d = decide(NOW, view(), load(None), ControllerState(), make_config(min_replicas=1), make_planning(), VARIANTS)
    assert d.kind == "reconfigure"
    assert kinds(d.actions) == ["StartReplica", "AwaitReady", "RouteReplica"]
    # No traffic with one replica up: the plan needs none, the floor keeps it.
    d = decide(NOW, view(replica("cpu-0")), load(0.0), planned(at=NOW - 100), make_config(), make_planning(),
               VARIANTS)
    assert not d.actions


def test_no_plan_keeps_the_running_replicas():
    # A deadline nothing on one GPU meets (SLO scale 0.5): INFEASIBLE, so nothing changes.
    d = decide(NOW, view(replica("cpu-0")), load(5.0), planned(at=NOW - 100), make_config(),
               make_planning(gpus=1, slo_scale=0.5), VARIANTS)
    assert d.kind == "hold" and "infeasible" in d.reason and not d.actions


def test_reconcile_finishes_half_done_work_before_planning():
    cluster = view(
        replica("cpu-0"),
        replica("cpu-1", is_routed=False),  # started by a previous life, never routed
        replica("cpu-2", is_draining=True, num_in_flight=1),  # drain begun, not finished
        replica("cpu-3", is_routed=False, app_status=FAILED),
        replica("cpu-4", app_status=MISSING),  # its application is gone
    )
    d = decide(NOW, cluster, load(50.0), ControllerState(), make_config(), make_planning(), VARIANTS)
    assert d.kind == "reconcile" and not d.has_planned
    assert set(d.actions) == {RouteReplica("cpu-1"), StopReplica("cpu-3"), UnrouteReplica("cpu-4"),
                              AwaitDrained(("cpu-2",)), StopReplica("cpu-2")}
    assert d.actions.index(AwaitDrained(("cpu-2",))) < d.actions.index(StopReplica("cpu-2"))


def test_a_starting_replica_is_waited_for():
    cluster = view(replica("cpu-0"), replica("cpu-1", is_routed=False, app_status=STARTING))
    d = decide(NOW, cluster, load(50.0), ControllerState(), make_config(), make_planning(), VARIANTS)
    assert d.kind == "wait" and not d.actions and "cpu-1" in d.reason


def test_low_attainment_replans_at_most_once_per_window():
    config = make_config(window_s=10)
    assert plan_trigger(NOW, load(1.0, attainment=0.5), planned(at=NOW - 11), config).startswith("SLO")
    assert plan_trigger(NOW, load(1.0, attainment=0.5), planned(at=NOW - 3), config) is None
    assert plan_trigger(NOW, load(1.0, attainment=0.95), planned(at=NOW - 11), config) is None


def test_ready_replicas_serve_only_when_routed_and_not_draining():
    assert replica("a").is_serving
    assert not replica("a", is_draining=True).is_serving
    assert not replica("a", is_routed=False).is_serving
    assert not replica("a", app_status=STARTING).is_serving
    assert replica("a", app_status=READY).is_idle


def test_no_plan_while_a_routed_replica_does_not_answer():
    cluster = view(replica("cpu-0"), replica("cpu-1", threshold=None, app_status=STARTING))
    d = decide(NOW, cluster, load(50.0), ControllerState(), make_config(), make_planning(), VARIANTS)
    assert d.kind == "wait" and "cpu-1 does not answer" in d.reason


def missing(rate: float, attainment: float, ended: int = 50) -> LoadEstimate:
    return LoadEstimate(rate, attainment, LENGTHS, 10.0, ended)


def test_missed_slo_the_profiles_say_is_met_scales_capacities_down_and_adds_a_replica():
    # The profiles say one replica at 0.9 serves 1.0 req/s (capacity ~1.14); it meets only half.
    state = planned(at=NOW - 100)
    d = decide(NOW, view(replica("cpu-0")), missing(1.0, 0.45), state, make_config(), make_planning(), VARIANTS)
    assert d.capacity_factor == pytest.approx(0.5)
    assert "capacities scaled x0.50" in d.reason
    assert d.kind == "reconfigure" and StartReplica("cpu-1", "cpu", 0.9) in d.actions


def test_capacity_correction_needs_a_clean_full_window():
    config = make_config(window_s=10, min_window_requests=20)
    one = view(replica("cpu-0"))
    for state, load_ in ((planned(at=NOW - 100, reconfigured=NOW - 5), missing(1.0, 0.45)),  # mixed window
                         (ControllerState(NOW - 100, 1.0, None, LENGTHS, None, 1.0, NOW - 5), missing(1.0, 0.45)),
                         (planned(at=NOW - 100), missing(1.0, 0.45, ended=5))):  # too few requests
        d = decide(NOW, one, load_, state, config, make_planning(), VARIANTS)
        assert d.capacity_factor is None, d.reason
    # The profiles already predict the miss (3 req/s on one replica): the model is not at fault.
    d = decide(NOW, one, missing(3.0, 0.45), planned(at=NOW - 100), config, make_planning(), VARIANTS)
    assert d.capacity_factor is None


def test_capacity_factor_recovers_slowly_while_the_slo_is_met_and_has_a_floor():
    state = ControllerState(NOW - 100, 1.0, None, LENGTHS, None, capacity_factor=0.5)
    d = decide(NOW, view(replica("cpu-0"), replica("cpu-1")), missing(1.0, 0.99), state, make_config(),
               make_planning(), VARIANTS)
    assert d.capacity_factor == pytest.approx(0.525)
    state = ControllerState(NOW - 100, 1.0, None, LENGTHS, None, capacity_factor=0.3)
    d = decide(NOW, view(replica("cpu-0"), replica("cpu-1")), missing(0.3, 0.1), state,
               make_config(min_capacity_factor=0.25), make_planning(), VARIANTS)
    assert d.capacity_factor == pytest.approx(0.25)


def test_a_shrink_waits_for_a_whole_window_of_load_but_scaling_up_does_not():
    two = view(replica("cpu-0"), replica("cpu-1"))
    short = LoadEstimate(0.2, 1.0, LENGTHS, 3.0)  # the first 3 s of traffic
    d = decide(NOW, two, short, ControllerState(), make_config(window_s=10), make_planning(), VARIANTS)
    assert d.kind == "hold" and "measured over 3 s" in d.reason and not d.actions
    assert not d.has_planned  # asked again next tick
    full = LoadEstimate(0.2, 1.0, LENGTHS, 10.0)
    d = decide(NOW, two, full, ControllerState(), make_config(window_s=10), make_planning(), VARIANTS)
    assert d.kind == "reconfigure" and DrainReplica("cpu-1") in d.actions
    busy = LoadEstimate(3.0, 1.0, LENGTHS, 3.0)
    d = decide(NOW, view(replica("cpu-0")), busy, ControllerState(), make_config(window_s=10), make_planning(),
               VARIANTS)
    assert d.kind == "reconfigure" and "StartReplica" in kinds(d.actions)


def test_a_shrink_is_held_while_the_running_replicas_miss_the_slo():
    two = view(replica("cpu-0"), replica("cpu-1"))
    missing_some = LoadEstimate(0.2, 0.8, LENGTHS, 10.0, 40)
    d = decide(NOW, two, missing_some, planned(at=NOW - 100, rate=2.0), make_config(attainment_target=0.9),
               make_planning(), VARIANTS)
    assert d.kind == "hold" and "meet the SLO for 80.0%" in d.reason and not d.actions


def test_topped_up_fills_the_budget_with_the_plans_most_accurate_setting_at_its_smallest_degree():
    from dilaserve.controller.decision import topped_up

    assert topped_up(((1, 0.7, None, 1), (1, 0.9, None, 1)), 4) == ((1, 0.9, None, 3), (1, 0.7, None, 1))
    assert topped_up(((2, 0.9, None, 1),), 5) == ((2, 0.9, None, 2),)  # one GPU left over: no degree-2 fits
    assert topped_up(((1, 0.9, None, 2),), 2) == ((1, 0.9, None, 2),)  # already full
    assert topped_up((), 4) == ()


def test_a_dedicated_cluster_keeps_its_gpus_at_low_load():
    two = view(replica("cpu-0"), replica("cpu-1"))
    light = LoadEstimate(0.2, 1.0, LENGTHS, 10.0)
    elastic = decide(NOW, two, light, planned(at=NOW - 100, rate=2.0), make_config(), make_planning(), VARIANTS)
    assert DrainReplica("cpu-1") in elastic.actions  # an elastic cluster gives one back
    dedicated = decide(NOW, two, light, planned(at=NOW - 100, rate=2.0), make_config(keep_gpus=True),
                       make_planning(), VARIANTS)
    # The plan (one replica at 0.9) topped up to both GPUs is what runs: nothing to do.
    assert dedicated.kind == "hold" and not dedicated.actions, dedicated.reason
    assert "good enough" in dedicated.reason and "2x(p=1, t=0.9)" in dedicated.reason
