"""The simulated ingress decides as the Dispatcher would with every replica's prediction."""

from __future__ import annotations

import numpy as np
import pytest

from dilaserve.serving.admission import Prediction, decide
from dilaserve.serving.config import AdmissionConfig, RoutingConfig, SLOConfig
from dilaserve.serving.router import ReplicaLoad, make_router
from dilaserve.sim.ingress import Estimates, SimIngress


def reference(names, estimates, policy, overhead_s, slo_scale, in_flight, budget_s=None):
    """Dispatcher.dispatch's decision with one Prediction and one ReplicaLoad per replica."""
    solo = float(np.median(estimates.solo_s)) + overhead_s
    budget = slo_scale * solo if budget_s is None else budget_s
    decision = decide(budget, [Prediction(f + overhead_s, s + overhead_s)
                               for f, s in zip(estimates.finish_s.tolist(), estimates.solo_s.tolist())])
    if not decision.is_admitted:
        return -1, decision.retry_after_s
    loads = [ReplicaLoad(n, f, k) for n, f, k in zip(names, estimates.finish_s.tolist(), in_flight)]
    return names.index(make_router(policy).choose(loads, budget).name), 0


@pytest.mark.parametrize("seed", range(40))
def test_reduced_candidates_decide_as_all_replicas(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    names = [f"r-{i}" for i in range(n)]
    # Coarse values make exact ties and near-ties (within the router's tie_s) common.
    finish = rng.integers(1, 60, n) * 5e-4 * rng.choice([1.0, 10.0])
    solo = rng.integers(1, 8, n) * 2e-3
    estimates = Estimates(finish, solo, float(np.median(solo)), [0] * n)
    ingress = SimIngress(names, RoutingConfig("slack"), AdmissionConfig(), SLOConfig(slo_scale=2.0, overhead_ms=1.0))
    ingress.in_flight = rng.integers(0, 4, n).tolist()
    got = ingress.dispatch(estimates, 64)
    want = reference(names, estimates, "slack", 1e-3, 2.0, ingress.in_flight)
    assert (got.replica, got.retry_after_s) == want
    assert got.budget_s == pytest.approx(2.0 * (float(np.median(solo)) + 1e-3))


def test_round_robin_sees_every_replica_and_counts_in_flight():
    names = ["a", "b", "c"]
    ingress = SimIngress(names, RoutingConfig("round_robin"), AdmissionConfig(enabled=False), SLOConfig())
    estimates = Estimates(np.array([9.0, 0.1, 0.1]), np.full(3, 0.1), 0.1, [0, 0, 0])
    picks = [ingress.dispatch(estimates, 8).replica for _ in range(4)]
    assert picks == [0, 1, 2, 0]
    ingress.sent(1)
    ingress.sent(1)
    ingress.released(1)
    assert ingress.in_flight == [0, 1, 0]


def test_full_waiting_queues_are_skipped_then_refused():
    names = ["a", "b"]
    ingress = SimIngress(names, RoutingConfig("slack"), AdmissionConfig(max_waiting=2), SLOConfig())
    estimates = Estimates(np.array([0.1, 0.5]), np.full(2, 0.1), 0.1, [2, 0])
    assert ingress.dispatch(estimates, 8).replica == 1  # "a" is faster but its queue is full
    refused = ingress.dispatch(Estimates(np.array([0.1, 0.5]), np.full(2, 0.1), 0.1, [2, 5]), 8)
    assert refused.replica == -1 and refused.retry_after_s == 1
