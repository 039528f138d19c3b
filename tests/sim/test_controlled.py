"""The controller driving the simulated cluster (``sim.controlled``): the same ``Controller``
code, on the simulated clock. Invariants: every arrival has one record and no admitted request
is left unfinished; a draining replica takes no new request and finishes what it holds; a
replica is never stopped with requests in flight; after a load step the controller scales up
and attainment recovers where a static cluster's does not."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.decision import Planning
from dilaserve.controller.observation import READY, STARTING
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import request_work, work_s
from dilaserve.planner import ProfileSet
from dilaserve.planner.profiles import latency_profile_from_dict, quality_profile_from_dict
from dilaserve.replay.metrics import compute_metrics
from dilaserve.serving.config import AdmissionConfig, RequestDefaults, RoutingConfig, SLOConfig
from dilaserve.sim import AcceptanceModel, ClusterConfig, ReplicaGroup, SimPolicies, simulate
from dilaserve.sim.controlled import ControlSetup, SimulatedCluster, expand_slots, simulate_controlled
from dilaserve.sim.load_step import StepArrivals, load_step_trace
from dilaserve.sim.simulator import Replay
from dilaserve.sim.workload import Workload

LATENCY = {"cache": "dual", "degrees": [
    {"degree": 1, "fixed_s": 0.006, "per_token_s": 3.2e-05, "per_context_s": 1.3e-07, "max_running": 64,
     "kv_capacity_tokens": 100000}]}
QUALITY = {"block_size": 32, "entries": [
    {"threshold": 0.95, "accuracy": 0.792, "tokens_per_step": 2.4},
    {"threshold": 0.9, "accuracy": 0.785, "tokens_per_step": 3.25},
    {"threshold": 0.8, "accuracy": 0.771, "tokens_per_step": 4.2}]}
PROMPT, OUTPUT, BLOCK, SLO_SCALE = 256, 128, 32, 3.0


def make_setup(initial: int, gpus: int, *, routing: str = "slack", admission: bool = True, fidelity: str = "fast",
               startup_s: float = 5.0):
    profiles = ProfileSet(latency_profile_from_dict(LATENCY), quality_profile_from_dict(QUALITY), "test")
    degree = profiles.latency.degrees[0]
    engine = EngineConfig(max_running=degree.max_running, num_pages=degree.kv_capacity_tokens // 16)
    cluster = ClusterConfig((ReplicaGroup("tp1", initial, degree.cost, engine, 0.9),),
                            RequestDefaults(block_length=BLOCK, cache="dual"))
    acceptance = AcceptanceModel(tuple((e.threshold, e.tokens_per_step) for e in profiles.quality.settings()))
    tokens_per_step = acceptance.mean(0.9, BLOCK)

    def idle_s(prompt: int, output: int) -> float:
        return work_s(degree.cost, request_work(prompt + output, output, BLOCK, tokens_per_step, "dual"))

    policies = SimPolicies(routing=RoutingConfig(policy=routing), admission=AdmissionConfig(enabled=admission),
                           slo=SLOConfig(slo_scale=SLO_SCALE, overhead_ms=0.0), fidelity=fidelity,
                           acceptance=acceptance, baseline=idle_s)
    config = ControllerConfig(gpus=gpus, slo_scale=SLO_SCALE, quality_budget=1.0, tick_s=1.0, window_s=8.0,
                              period_s=8.0, min_interval_s=20.0, start_timeout_s=60.0, drain_timeout_s=30.0)
    planning = Planning(profiles, gpus=gpus, slo_scale=SLO_SCALE, quality_budget=1.0)
    return cluster, policies, ControlSetup(config, planning, {1: "tp1"}, startup_s=startup_s)


def attainment(records, lo: float, hi: float) -> float:
    part = [r for r in records if lo <= r.arrival_s < hi]
    return compute_metrics(part).slo_attainment


def assert_nothing_lost(records, num_arrivals: int) -> None:
    assert len(records) == num_arrivals
    assert sorted(r.request_id for r in records) == list(range(num_arrivals))
    for r in records:
        assert r.finish_s is not None and not math.isnan(r.finish_s) and r.finish_s >= r.arrival_s


def test_step_arrivals_double_the_rate():
    arrivals = StepArrivals(20.0, 50.0).sample(np.random.default_rng(0), duration_s=150.0)
    before, after = np.sum(arrivals < 50.0) / 50.0, np.sum(arrivals >= 50.0) / 100.0
    assert np.all(np.diff(arrivals) >= 0) and arrivals[-1] < 150.0
    assert 17 < before < 23 and 36 < after < 44
    assert len(StepArrivals(20.0, 50.0).sample(np.random.default_rng(0), num_requests=3000)) == 3000


def test_controller_scales_up_after_a_load_step_and_attainment_recovers():
    # Two replicas meet 10 req/s; 20 req/s needs about four.
    trace = load_step_trace(10.0, (30.0, 60.0), PROMPT, OUTPUT, seed=1)
    cluster, policies, control = make_setup(initial=2, gpus=6)
    run = simulate_controlled(trace, cluster, policies, control)
    static = simulate(trace, cluster, dataclasses.replace(policies, routing=RoutingConfig(policy="power_of_two"),
                                                          admission=AdmissionConfig(enabled=False)))
    assert_nothing_lost(run.records, len(trace))
    assert not run.violations
    starts = [t for t in run.ticks if any(a.startswith("StartReplica") for a in t.actions)]
    assert starts and all(t.time_s > 30.0 for t in starts)  # scaled up after the step, not before
    assert run.membership[-1].gpus_serving >= 3
    assert attainment(run.records, 0, 30) > 0.95
    late_controlled, late_static = attainment(run.records, 60, 90), attainment(static, 60, 90)
    assert late_controlled > 0.9 and late_controlled > late_static + 0.3, (late_controlled, late_static)


@pytest.mark.parametrize("fidelity", ["fast", "step"])
def test_a_draining_replica_takes_nothing_new_and_finishes_what_it_holds(fidelity):
    trace = load_step_trace(15.0, (20.0, 0.0), PROMPT, OUTPUT, seed=2)
    workload = Workload.from_trace(trace)
    cluster, policies, control = make_setup(initial=2, gpus=2, routing="round_robin", admission=False,
                                            fidelity=fidelity)
    replay = Replay(workload, expand_slots(cluster, control.variants, 2), policies)
    sim = SimulatedCluster(replay, cluster, control.variants, startup_s=3.0)
    sim.run_until(8.0)
    slot = sim.members["tp1-1"].slot
    held = [i for i in range(replay.num_arrived) if replay.replica_of[i] == slot
            and not replay.engines.finish_s[i] <= 8.0]
    assert held, "the replica should hold requests when it starts draining"
    sim.drain("tp1-1")
    with pytest.raises(RuntimeError):
        sim.stop_replica("tp1-1")  # refused while it holds requests ...
    assert sim.violations and "tp1-1" in sim.members  # ... and recorded, nothing removed
    sim.violations.clear()
    while not sim.is_drained("tp1-1"):
        sim.sleep(0.1)
    sim.stop_replica("tp1-1")
    # A new replica is not ready before its startup delay, and takes requests once routed.
    sim.start_replica("tp1-2", "tp1", 0.8)
    assert sim.replica_status(["tp1-2"]) == {"tp1-2": STARTING}
    sim.sleep(3.0)
    assert sim.replica_status(["tp1-2"]) == {"tp1-2": READY}
    sim.route("tp1-2")
    new_slot, route_s = sim.members["tp1-2"].slot, sim.now
    sim.run_until(math.inf)
    replay.finish()
    drain_s = 8.0
    late = [i for i in range(len(workload)) if workload.arrival_s[i] > drain_s]
    assert late and new_slot != slot  # the stopped slot went to the back of the free list
    assert not any(replay.replica_of[i] == slot for i in late if workload.arrival_s[i] < route_s)
    assert all(replay.engines.finish_s[i] > 8.0 for i in held)  # finished after the drain began, not dropped
    assert any(replay.replica_of[i] == new_slot for i in late if workload.arrival_s[i] >= route_s)
    used = replay.engines.threshold_used
    assert all(used[i] == pytest.approx(0.8) for i in late if replay.replica_of[i] == new_slot
               and workload.arrival_s[i] >= route_s)
    assert not sim.violations
    threshold_used = used.tolist()
    records = replay.records([threshold_used[i] if r >= 0 else None for i, r in enumerate(replay.replica_of)])
    assert_nothing_lost(records, len(workload))


def test_step_fidelity_runs_the_controller_too():
    trace = load_step_trace(5.0, (10.0, 15.0), PROMPT, OUTPUT, seed=3)
    cluster, policies, control = make_setup(initial=1, gpus=3, fidelity="step")
    run = simulate_controlled(trace, cluster, policies, control)
    assert_nothing_lost(run.records, len(trace))
    assert not run.violations and run.ticks
