"""Small builders for simulator tests."""

from __future__ import annotations

from dilaserve.replay.synthetic import FixedLength, IndependentLengths, LogNormalLength, PoissonArrivals, synthesize
from dilaserve.replay.trace import Trace


def poisson_trace(rate_rps: float, num_requests: int, *, seed: int = 0, prompt_tokens: int = 256,
                  output_tokens: int = 64, length_cv: float = 0.5) -> Trace:
    if length_cv > 0:
        lengths = IndependentLengths(LogNormalLength(prompt_tokens, length_cv),
                                     LogNormalLength(output_tokens, length_cv))
    else:
        lengths = IndependentLengths(FixedLength(prompt_tokens), FixedLength(output_tokens))
    return synthesize(PoissonArrivals(rate_rps), lengths, num_requests=num_requests, seed=seed)
