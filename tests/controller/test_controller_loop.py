"""The control loop against a fake cluster and a fake clock: what it does over many ticks, and
the invariants a real cluster relies on (the fake asserts them on every call): a replica is
routed only once ready, stopped only once drained; serving capacity never dips during a
reconfiguration; a failed start changes nothing; a restarted controller picks up where the
cluster is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dilaserve.controller.actions import AwaitDrained, DrainReplica, StopReplica
from dilaserve.controller.apply import apply
from dilaserve.controller.config import ControllerConfigError, parse_controller_config
from dilaserve.controller.controller import Controller
from dilaserve.controller.decision import Planning, diff
from dilaserve.controller.observation import LoadSnapshot, LoadWindow, nearest

from controller_helpers import VARIANTS, FakeClock, FakeCluster, make_config, make_planning, make_profiles


def make_controller(cluster: FakeCluster, **config) -> Controller:
    return Controller(make_config(**config), cluster, make_planning(gpus=config.get("gpus", 2)), VARIANTS,
                      clock=cluster.clock, sleep=cluster.clock.sleep, poll_s=0.5)


def run(controller: Controller, cluster: FakeCluster, rate_rps: float, seconds: float) -> None:
    """Ticks every second for ``seconds`` with arrivals at ``rate_rps``."""
    end = cluster.clock.now + seconds
    while cluster.clock.now < end:
        cluster.offer(rate_rps, 1.0)
        cluster.clock.now += 1.0
        controller.tick()


def test_scales_up_under_load_and_back_down_when_it_ends():
    cluster = FakeCluster(FakeClock())
    cluster.add("cpu-0")
    controller = make_controller(cluster, min_interval_s=20)
    run(controller, cluster, 0.5, 15)
    assert cluster.serving() == ["cpu-0"] and not cluster.calls
    run(controller, cluster, 3.0, 15)  # one replica serves ~1.1 req/s at 0.9, ~2 at 0.7
    assert sorted(cluster.serving()) == ["cpu-0", "cpu-1"]
    assert [c[0] for c in cluster.calls if c[0] != "set_policy"] == ["start", "route"]
    cluster.replicas["cpu-1"].num_in_flight = 3  # still busy when the load ends
    run(controller, cluster, 0.0, 60)
    assert cluster.serving() == ["cpu-0"]
    # On the way up a lower threshold first (the rate window climbs), then a second replica.
    assert cluster.calls == [("set_policy", "cpu-0", 0.7, None), ("start", "cpu-1", 0.9), ("route", "cpu-1"),
                             ("drain", "cpu-1"), ("stop", "cpu-1")]
    assert min(cluster.serving_counts) >= 1
    assert controller.num_reconfigurations == 3


def test_load_that_wobbles_within_the_hysteresis_does_not_flap():
    cluster = FakeCluster(FakeClock())
    cluster.add("cpu-0")
    cluster.add("cpu-1")
    controller = make_controller(cluster, period_s=5, min_interval_s=0)
    for _ in range(10):  # 2.0 and 1.8 req/s in turn: two replicas either way with 20% headroom
        run(controller, cluster, 2.0, 5)
        run(controller, cluster, 1.8, 5)
    assert not cluster.calls, cluster.calls


def test_threshold_only_change_is_pushed_live():
    cluster = FakeCluster(FakeClock())
    cluster.add("cpu-0", threshold=0.9)
    controller = make_controller(cluster, gpus=1)
    run(controller, cluster, 1.5, 20)
    assert cluster.calls == [("set_policy", "cpu-0", 0.7, None)]
    assert cluster.serving() == ["cpu-0"]


def test_a_replica_that_fails_to_start_changes_nothing_and_is_removed():
    cluster = FakeCluster(FakeClock(), fail_to_start={"cpu-1"})
    cluster.add("cpu-0")
    controller = make_controller(cluster)
    run(controller, cluster, 2.0, 12)
    assert cluster.serving() == ["cpu-0"]
    assert cluster.calls[:2] == [("start", "cpu-1", 0.9), ("stop", "cpu-1")]
    assert not any(c[0] in ("drain", "set_policy") for c in cluster.calls)
    assert controller.history[-1].kind in ("reconfigure", "hold", "idle")
    assert any(r.error and "failed to start" in r.error for r in controller.history)


def test_drain_timeout_leaves_the_replica_draining_and_a_later_tick_removes_it():
    cluster = FakeCluster(FakeClock(), requests_finish_per_poll=0)
    cluster.add("cpu-0")
    cluster.add("cpu-1", num_in_flight=2)
    controller = make_controller(cluster, drain_timeout_s=3, window_s=1.0)  # a whole window of load within 5 s
    run(controller, cluster, 0.1, 5)
    assert cluster.replicas["cpu-1"].is_draining and "cpu-1" in cluster.replicas  # not stopped
    assert cluster.calls == [("drain", "cpu-1")]
    cluster.requests_finish_per_poll = 1
    run(controller, cluster, 0.1, 3)
    assert "cpu-1" not in cluster.replicas
    assert [c[0] for c in cluster.calls] == ["drain", "stop"]


def test_a_new_controller_resumes_from_what_it_observes():
    cluster = FakeCluster(FakeClock())
    cluster.add("cpu-0")
    first = make_controller(cluster)
    run(first, cluster, 2.0, 12)
    assert len(cluster.serving()) == 2
    calls = len(cluster.calls)
    # It dies mid-removal: a replica draining, not yet stopped.
    cluster.replicas["cpu-1"].is_draining = True
    second = make_controller(cluster)  # no memory of the first
    run(second, cluster, 0.5, 3)
    assert cluster.calls[calls:] == [("stop", "cpu-1")]
    # Steady load afterwards: the running replica is enough, nothing changes.
    run(second, cluster, 0.5, 60)
    assert cluster.calls[calls:] == [("stop", "cpu-1")]


def test_every_reconfiguration_keeps_serving_capacity():
    # Two degree-1 replicas become one degree-2: the new one serves before the old ones drain.
    cluster = FakeCluster(FakeClock())
    cluster.add("cpu-0")
    cluster.add("cpu-1")
    actions = diff([v for v in cluster.observe(0).cluster.replicas], {(2, 0.9, None): 1}, VARIANTS, {"cpu-0", "cpu-1"})
    result = apply(actions, cluster, start_timeout_s=30, drain_timeout_s=30, clock=cluster.clock,
                   sleep=cluster.clock.sleep)
    assert result.is_complete
    assert cluster.serving() == ["tp2-0"]
    assert [c[0] for c in cluster.calls] == ["start", "route", "drain", "drain", "stop", "stop"]
    assert min(cluster.serving_counts) >= 1


def test_nothing_is_removed_if_routing_the_new_replica_fails():
    cluster = FakeCluster(FakeClock())
    cluster.add("cpu-0")

    def broken_route(name):
        raise RuntimeError("ingress unreachable")

    cluster.route = broken_route
    actions = diff([v for v in cluster.observe(0).cluster.replicas], {(2, 0.9, None): 1}, VARIANTS, {"cpu-0"})
    result = apply(actions, cluster, start_timeout_s=30, drain_timeout_s=30, clock=cluster.clock,
                   sleep=cluster.clock.sleep)
    assert not result.is_complete and "ingress unreachable" in result.error
    assert not any(isinstance(a, (DrainReplica, AwaitDrained, StopReplica)) for a in result.done)
    assert cluster.serving() == ["cpu-0"]


def test_load_window_rate_attainment_and_restarted_counters():
    w = LoadWindow(window_s=10)
    assert w.estimate().rate_rps is None
    for t in range(0, 21):  # 2 req/s, 3 of 4 ended requests within SLO, 1 refused in 4
        w.add(LoadSnapshot(float(t), "a", 2 * t, t // 2, 2 * t - t // 2, (3 * t) // 2))
    est = w.estimate()
    assert est.rate_rps == pytest.approx(2.0) and est.span_s == pytest.approx(10.0)
    assert est.attainment == pytest.approx(0.75)
    w.add(LoadSnapshot(21.0, "b", 1, 0, 0, 0))  # a new ingress: counters from zero
    assert w.estimate().rate_rps is None
    w.add(LoadSnapshot(22.0, "b", 4, 0, 0, 0))
    assert w.estimate().rate_rps == pytest.approx(3.0)


def test_nearest_threshold():
    assert nearest(0.88, [0.5, 0.7, 0.9]) == 0.9
    assert nearest(0.8, [0.7, 0.9]) == 0.9  # a tie goes to the more accurate
    assert nearest(None, [0.9]) is None


def test_planning_keeps_only_degrees_with_a_variant():
    planning = Planning.for_degrees(make_profiles(), [1], gpus=4, slo_scale=3.0, quality_budget=1.0)
    assert [d.degree for d in planning.profiles.latency.degrees] == [1]
    with pytest.raises(ValueError, match="none of the variants"):
        Planning.for_degrees(make_profiles(), [8], gpus=8, slo_scale=3.0, quality_budget=1.0)


def test_config_is_validated_at_the_edge():
    assert parse_controller_config({"gpus": 2, "period_s": 5}).period_s == 5
    for bad, field in (({"gpus": 0}, "gpus"), ({"gpus": 1, "tick_s": 5, "window_s": 2}, "window_s"),
                       ({"gpus": 1, "length_statistic": "p900"}, "length_statistic"), ({"gpus": 1, "x": 1}, "x")):
        with pytest.raises(ControllerConfigError, match=field):
            parse_controller_config(bad)


def test_the_decision_side_imports_neither_torch_nor_ray():
    code = ("import sys; import dilaserve.controller.controller, dilaserve.controller.decision, "
            "dilaserve.controller.apply; bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
