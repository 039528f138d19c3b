"""Sparse KV in the controller: a plan's retention reaches the replicas (started with it or
pushed live with the threshold), against the real PuLP planner and a fake cluster."""

from __future__ import annotations

from dilaserve.controller.actions import SetPolicy, StartReplica
from dilaserve.controller.controller import Controller
from dilaserve.controller.decision import ControllerState, Planning, decide, diff, running_instances
from dilaserve.controller.observation import LoadEstimate, nearest_setting

from tests.planner.test_planner_sparse import profiles as sparse_profiles

from controller_helpers import VARIANTS, FakeClock, FakeCluster, make_config, replica, view

# The planner tests' profiles: sparse at retention 0.5 pays at 4000-token prompts (and not at
# 64), for 1 accuracy point.
LONG, SHORT = ((4000, 64),) * 8, ((64, 64),) * 8
NOW = 1000.0


def sparse_planning(quality_budget: float = 2.0) -> Planning:
    profiles = sparse_profiles()
    return Planning(profiles, gpus=8, slo_scale=3.0, quality_budget=quality_budget)


def test_a_long_context_plan_pushes_sparse_to_the_running_replica_and_starts_sparse_ones():
    d = decide(NOW, view(replica("cpu-0")), LoadEstimate(9.0, 1.0, LONG, 10.0), ControllerState(),
               make_config(gpus=8), sparse_planning(), VARIANTS)
    assert d.kind == "reconfigure", d.reason
    assert all(r == 0.5 for _, _, r, _ in d.target) and "kv=0.5" in d.reason
    assert SetPolicy("cpu-0", 0.9, 0.5) in d.actions
    starts = [a for a in d.actions if isinstance(a, StartReplica)]
    assert starts and all(a.kv_retention == 0.5 for a in starts)


def test_short_prompts_or_no_budget_keep_replicas_dense():
    for lengths, budget in ((SHORT, 5.0), (LONG, 0.0)):
        d = decide(NOW, view(replica("cpu-0")), LoadEstimate(9.0, 1.0, lengths, 10.0), ControllerState(),
                   make_config(gpus=8), sparse_planning(budget), VARIANTS)
        assert all(r is None for _, _, r, _ in d.target), d.target
        assert not any(getattr(a, "kv_retention", None) for a in d.actions)


def test_diff_matches_retention_and_pushes_a_change_with_the_threshold():
    dense, sparse = replica("cpu-0"), replica("cpu-1", kv_retention=0.5)
    assert diff([sparse], {(1, 0.9, 0.5): 1}, VARIANTS, {"cpu-1"}) == []
    assert diff([dense], {(1, 0.9, 0.5): 1}, VARIANTS, {"cpu-0"}) == [SetPolicy("cpu-0", 0.9, 0.5)]
    assert diff([sparse], {(1, 0.9, None): 1}, VARIANTS, {"cpu-1"}) == [SetPolicy("cpu-1", 0.9, None)]
    # Each replica keeps the setting it already runs; nothing is pushed.
    assert diff([dense, sparse], {(1, 0.9, None): 1, (1, 0.9, 0.5): 1}, VARIANTS, {"cpu-0", "cpu-1"}) == []


def test_running_replicas_snap_to_the_nearest_setting_of_their_kind():
    planning = sparse_planning()
    running = running_instances([replica("a", 0.88), replica("b", 0.88, kv_retention=0.45),
                                 replica("c", None, kv_retention=0.5)], planning)
    assert running == ((1, 0.9, None, 2), (1, 0.9, 0.5, 1))  # "c": threshold unknown, so the reference
    assert nearest_setting(0.7, 0.5, [(0.9, None)]) == (0.9, None)  # no sparse setting: the nearest dense


def test_the_control_loop_leaves_the_replicas_sparse_under_long_context_load():
    cluster = FakeCluster(FakeClock(), lengths=LONG)
    cluster.add("cpu-0")
    controller = Controller(make_config(gpus=8), cluster, sparse_planning(), VARIANTS, clock=cluster.clock,
                            sleep=cluster.clock.sleep, poll_s=0.5)
    end = cluster.clock.now + 30
    while cluster.clock.now < end:
        cluster.offer(9.0, 1.0)
        cluster.clock.now += 1.0
        controller.tick()
    serving = [cluster.replicas[n] for n in cluster.serving()]
    assert len(serving) >= 2 and all(r.kv_retention == 0.5 for r in serving)
    assert ("set_policy", "cpu-0", 0.9, 0.5) in cluster.calls
    assert min(cluster.serving_counts) >= 1
