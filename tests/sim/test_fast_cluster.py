"""Fast fidelity's vectorized predictions are the engine's ``batch_work_s`` over ``request_work``."""

from __future__ import annotations

import numpy as np
import pytest

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import StepCost, batch_work_s, expected_tokens_per_step, request_work, work_s
from dilaserve.replay.trace import Trace, TraceRequest
from dilaserve.serving.config import RequestDefaults
from dilaserve.sim import ClusterConfig, ReplicaGroup, SimPolicies, Workload
from dilaserve.sim.fast_cluster import FastCluster

LENGTHS = [(300, 64), (120, 200), (40, 17), (500, 96), (64, 64), (256, 33)]  # (prompt, output)
NEW = (200, 80)


def build(cache: str, replicas: int = 1, max_running: int = 3):
    trace = Trace(tuple(TraceRequest(0.0, p, o) for p, o in LENGTHS + [NEW]))
    workload = Workload.from_trace(trace)
    cost = StepCost(3e-3, 3e-5, 2e-7)
    cluster = ClusterConfig.homogeneous(replicas, cost, EngineConfig(max_running=max_running, num_pages=1024),
                                        defaults=RequestDefaults(cache=cache))
    released = []
    return FastCluster(cluster, SimPolicies(), workload, released.append), cost, released


def predicted(prompt: int, output: int, cache: str):
    return request_work(prompt + output, output, 32, expected_tokens_per_step(0.9, 32, None), cache)


@pytest.mark.parametrize("cache", ["dual", "prefix", "none"])
def test_prediction_at_a_join_is_batch_work_of_every_request(cache):
    sim, cost, _ = build(cache)
    for i in range(len(LENGTHS)):  # 3 join at once, 3 wait (max_running=3)
        assert sim.submit(0.0, 0, i, deadline_s=10.0 + i) is None
    estimates = sim.estimates(0.0, len(LENGTHS))
    works = [predicted(p, o, cache) for p, o in LENGTHS] + [predicted(*NEW, cache)]
    assert estimates.finish_s[0] == pytest.approx(batch_work_s(cost, works), rel=1e-9)
    assert estimates.solo_s[0] == pytest.approx(work_s(cost, works[-1]), rel=1e-12)


def test_prediction_falls_as_the_replica_works_and_ends_at_the_solo_time():
    sim, cost, released = build("dual")
    for i in range(len(LENGTHS)):
        sim.submit(0.0, 0, i, deadline_s=10.0)
    times = np.linspace(0.0, 3.0, 301)
    finish = []
    for t in times:
        sim.advance(t)
        finish.append(sim.estimates(t, len(LENGTHS)).finish_s[0])
    assert all(b <= a + 1e-12 for a, b in zip(finish, finish[1:]))
    assert len(released) == len(LENGTHS)
    assert finish[-1] == pytest.approx(work_s(cost, predicted(*NEW, "dual")))


def test_each_replica_predicts_its_own_load_with_its_own_cost():
    trace = Trace(tuple(TraceRequest(0.0, p, o) for p, o in LENGTHS + [NEW]))
    slow = StepCost(6e-3, 6e-5, 4e-7)
    cluster = ClusterConfig((ReplicaGroup("fast", 2), ReplicaGroup("slow", 1, slow)))
    sim = FastCluster(cluster, SimPolicies(), Workload.from_trace(trace), lambda r: None)
    sim.submit(0.0, 1, 0, 10.0)  # fast-1 busy, fast-0 and slow-0 idle
    estimates = sim.estimates(0.0, len(LENGTHS))
    new = predicted(*NEW, "dual")
    assert estimates.finish_s[0] == pytest.approx(work_s(StepCost(), new))
    assert estimates.finish_s[1] == pytest.approx(batch_work_s(StepCost(), [predicted(*LENGTHS[0], "dual"), new]))
    assert estimates.finish_s[2] == pytest.approx(work_s(slow, new))
    assert estimates.median_solo_s == pytest.approx(work_s(StepCost(), new))


def test_an_arrival_never_dates_a_running_requests_departure_before_its_own_start():
    """A running request finishes at a fractional step (k + f); a newcomer arriving after step k
    must not join at step k + 1, past that finish: that once moved the step origin beyond it and
    dated its departure before the newcomer's arrival."""
    cost = StepCost(3e-3, 3e-5, 2e-7)
    for output in range(8, 200):
        trace = Trace((TraceRequest(0.0, 40, output), TraceRequest(0.0, 300, 64)))
        cluster = ClusterConfig.homogeneous(1, cost, EngineConfig(num_pages=1024), defaults=RequestDefaults(cache="dual"))
        sim = FastCluster(cluster, SimPolicies(), Workload.from_trace(trace), lambda r: None)
        assert sim.submit(0.0, 0, 0, deadline_s=10.0) is None
        rep = sim._replicas[0]
        finish_step, rate = rep.running[0][0], rep.rate
        if 0.05 < finish_step % 1 < 0.95:
            break
    else:
        pytest.fail("no output length gives a finish at a fractional step")
    scheduled = finish_step / rate
    arrival = (finish_step // 1 + (finish_step % 1) / 2) / rate  # after step k ends, before the finish
    sim.advance(arrival)
    assert sim.submit(arrival, 0, 1, deadline_s=10.0) is None
    sim.advance(100.0)
    assert sim.finish_s[0] == pytest.approx(scheduled)  # it leaves when it was due, not earlier
    assert sim.finish_s[1] > arrival and sim.first_token_s[1] > arrival
