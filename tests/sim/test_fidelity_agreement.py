"""Step and fast fidelity agree on small traces.

Tolerance, for loads up to ~85% of capacity: SLO attainment within 0.05 absolute, end-to-end
p50 within 10%, p90 and p99 within 15%, TTFT p50 within 20%. Measured over 40 runs (1-8
replicas, each policy, 30-85% load, two seeds): at most 0.02, 5.5%, 12.5% / 13% and 17%.
At 100% load the gaps grow (attainment up to 0.085, p50 up to 14%): fast fidelity runs each
request's expected step count, and near saturation queueing amplifies small differences.
"""

from __future__ import annotations

import pytest

from dilaserve.replay.metrics import compute_metrics
from dilaserve.serving.config import AdmissionConfig, RoutingConfig
from dilaserve.sim import ClusterConfig, SimPolicies, simulate
from tests.sim.helpers import poisson_trace

CASES = [  # replicas, rate (req/s), policy, admission
    (1, 20, "slack", False),  # ~55% of one replica's capacity
    (1, 28, "slack", False),  # ~80%
    (4, 80, "slack", True),
    (4, 110, "slack", True),  # ~75% with refusals
    (4, 80, "round_robin", False),
    (2, 50, "power_of_two", True),
]


def relative(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize("replicas,rate,policy,admission", CASES)
def test_step_and_fast_fidelity_agree(replicas, rate, policy, admission):
    trace = poisson_trace(rate, 250 * replicas, seed=1)
    cluster = ClusterConfig.homogeneous(replicas)
    step, fast = (
        compute_metrics(simulate(trace, cluster, SimPolicies(routing=RoutingConfig(policy=policy), fidelity=fidelity,
                                                             admission=AdmissionConfig(enabled=admission))))
        for fidelity in ("step", "fast")
    )
    assert abs(step.slo_attainment - fast.slo_attainment) <= 0.05
    assert relative(fast.e2e_s.p50, step.e2e_s.p50) <= 0.10
    assert relative(fast.e2e_s.p90, step.e2e_s.p90) <= 0.15
    assert relative(fast.e2e_s.p99, step.e2e_s.p99) <= 0.15
    assert relative(fast.ttft_s.p50, step.ttft_s.p50) <= 0.20
