"""Synthetic arrivals and lengths: their statistics match what was asked for."""

from __future__ import annotations

import numpy as np
import pytest

from dilaserve.replay.synthetic import (
    EmpiricalLength, FixedLength, GammaArrivals, IndependentLengths, LogNormalLength, OnOffArrivals,
    PoissonArrivals, ResampledLengths, UniformLength, interarrival_cv, synthesize,
)
from dilaserve.replay.trace import Trace, TraceRequest

FIXED = IndependentLengths(FixedLength(100), FixedLength(20))


@pytest.mark.parametrize("arrivals, cv", [(PoissonArrivals(5.0), 1.0), (GammaArrivals(5.0, cv=3.0), 3.0),
                                          (GammaArrivals(5.0, cv=0.5), 0.5)])
def test_renewal_processes_hit_rate_and_burstiness(arrivals, cv):
    trace = synthesize(arrivals, FIXED, num_requests=50_000, seed=0)
    assert len(trace) == 50_000 and trace[0].arrival_s == 0.0
    assert (len(trace) - 1) / trace.span_s == pytest.approx(5.0, rel=0.05)
    assert interarrival_cv([r.arrival_s for r in trace]) == pytest.approx(cv, rel=0.1)


def test_on_off_mean_rate_and_bursts():
    arrivals = OnOffArrivals(on_rate_rps=10.0, mean_on_s=5.0, mean_off_s=15.0, off_rate_rps=1.0)
    assert arrivals.mean_rate_rps == pytest.approx((50 + 15) / 20)
    trace = synthesize(arrivals, FIXED, duration_s=40_000, seed=1)
    assert len(trace) / 40_000 == pytest.approx(arrivals.mean_rate_rps, rel=0.1)
    assert interarrival_cv([r.arrival_s for r in trace]) > 1.3
    assert len(synthesize(arrivals, FIXED, num_requests=123, seed=1)) == 123


def test_duration_bound_and_seeds():
    a = synthesize(PoissonArrivals(2.0), FIXED, duration_s=100.0, seed=4)
    assert all(0.0 <= r.arrival_s < 100.0 for r in a) and 150 < len(a) < 250
    assert synthesize(PoissonArrivals(2.0), FIXED, duration_s=100.0, seed=4) == a
    assert synthesize(PoissonArrivals(2.0), FIXED, duration_s=100.0, seed=5) != a
    with pytest.raises(ValueError):
        synthesize(PoissonArrivals(2.0), FIXED, seed=0)


def test_length_distributions():
    rng = np.random.default_rng(0)
    values = LogNormalLength(200, 0.5).sample(rng, 50_000)
    assert values.mean() == pytest.approx(200, rel=0.02)
    assert values.std() / values.mean() == pytest.approx(0.5, rel=0.05)
    capped = LogNormalLength(200, 2.0, min_tokens=5, max_tokens=300).sample(rng, 1000)
    assert capped.min() >= 5 and capped.max() <= 300
    uniform = UniformLength(3, 5).sample(rng, 1000)
    assert set(uniform.tolist()) == {3, 4, 5}
    assert set(EmpiricalLength((7, 9)).sample(rng, 100).tolist()) == {7, 9}
    assert FixedLength(0).sample(rng, 2).tolist() == [1, 1]


def test_resampled_lengths_keep_pairs():
    source = Trace((TraceRequest(0.0, 10, 1), TraceRequest(1.0, 500, 90)))
    trace = synthesize(PoissonArrivals(1.0), ResampledLengths.from_trace(source), num_requests=200, seed=2)
    assert {(r.prompt_tokens, r.output_tokens) for r in trace} == {(10, 1), (500, 90)}
