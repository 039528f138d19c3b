"""Comparing a simulated run with a real one (the arithmetic; the real replay comes later)."""

from __future__ import annotations

import pytest

from dilaserve.replay.records import RequestRecord, Status
from dilaserve.sim import ClusterConfig, SimPolicies, simulate
from dilaserve.sim.validation import Tolerance, compare
from tests.sim.helpers import poisson_trace


def record(i: int, e2e: float, ok: bool = True) -> RequestRecord:
    return RequestRecord(i, float(i), float(i), i + e2e / 4, i + e2e, 10, 10, 10 if ok else 0,
                         Status.OK if ok else Status.REFUSED, deadline_s=1.0)


def test_identical_runs_agree_and_shifted_latency_does_not():
    real = [record(i, 0.5 + 0.01 * i) for i in range(50)]
    assert compare(real, real).is_within
    slower = [record(i, 1.3 * (0.5 + 0.01 * i)) for i in range(50)]
    result = compare(real, slower)
    assert not result.is_within and "e2e p50" in result.violations and "attainment" in result.violations
    assert result.differences["e2e p50"] == pytest.approx(0.3)


def test_attainment_tolerance_is_absolute():
    real = [record(i, 0.5, ok=i % 10 != 0) for i in range(100)]  # 90% met
    sim = [record(i, 0.5, ok=i % 20 != 0) for i in range(100)]  # 95% met
    assert compare(real, sim).is_within
    assert not compare(real, sim, Tolerance(attainment=0.04)).is_within


def test_a_simulation_against_itself_at_another_fidelity():
    trace = poisson_trace(60, 400, seed=7)
    step = simulate(trace, ClusterConfig.homogeneous(3), SimPolicies(fidelity="step"))
    fast = simulate(trace, ClusterConfig.homogeneous(3))
    assert compare(step, fast).is_within, compare(step, fast).summary()


def test_p90_can_have_its_own_tolerance():
    real = [record(i, 0.5 + 0.01 * i) for i in range(50)]
    tail_slower = [record(i, (0.5 + 0.01 * i) * (1.5 if i >= 40 else 1.0)) for i in range(50)]
    loose = Tolerance(attainment=1.0, latency=0.1, p90_latency=0.6, tail_latency=0.6)
    assert "e2e p90" in compare(real, tail_slower, Tolerance(attainment=1.0, latency=0.1, tail_latency=0.6)).violations
    assert compare(real, tail_slower, loose).is_within, compare(real, tail_slower, loose).summary()
