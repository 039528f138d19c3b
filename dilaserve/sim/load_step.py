"""A load step: Poisson arrivals at one rate, then at ``factor`` times it (2: the rate doubles).

The trace the controller is judged on (issue 7): the static baseline meets the first phase
and cannot meet the second. ``StepArrivals`` is an ``ArrivalProcess`` (``replay.synthetic``'s
protocol), so ``synthesize`` pairs it with any length model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dilaserve.replay.synthetic import FixedLength, IndependentLengths, LengthModel, PoissonArrivals, synthesize
from dilaserve.replay.trace import Trace


@dataclass(frozen=True)
class StepArrivals:
    """Poisson at ``rate_rps`` before ``step_s`` seconds, at ``factor x rate_rps`` after."""

    rate_rps: float
    step_s: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (self.rate_rps > 0 and self.step_s >= 0 and self.factor > 0):
            raise ValueError(f"need rate_rps > 0, step_s >= 0, factor > 0; got {self.rate_rps}, {self.step_s}, "
                             f"{self.factor}")

    @property
    def mean_rate_rps(self) -> float:  # the rate after the step (the one that lasts)
        return self.rate_rps * self.factor

    def sample(self, rng: np.random.Generator, *, num_requests: int | None = None,
               duration_s: float | None = None) -> np.ndarray:
        if (num_requests is None) == (duration_s is None):
            raise ValueError("give exactly one of num_requests and duration_s")
        before = PoissonArrivals(self.rate_rps).sample(rng, duration_s=self.step_s)
        if duration_s is not None:
            before = before[before < duration_s]
            after_s = duration_s - self.step_s
            if after_s <= 0:
                return before
            after = PoissonArrivals(self.rate_rps * self.factor).sample(rng, duration_s=after_s)
            return np.concatenate((before, self.step_s + after))
        if len(before) >= num_requests:
            return before[:num_requests]
        after = PoissonArrivals(self.rate_rps * self.factor).sample(rng, num_requests=num_requests - len(before))
        return np.concatenate((before, self.step_s + after))


def load_step_trace(rate_rps: float, phases_s: tuple[float, float], prompt_tokens: int, output_tokens: int, *,
                    factor: float = 2.0, lengths: LengthModel | None = None, seed: int = 0) -> Trace:
    """``phases_s[0]`` seconds at ``rate_rps``, then ``phases_s[1]`` seconds at ``factor x``
    that; fixed lengths unless ``lengths`` is given."""
    lengths = lengths or IndependentLengths(FixedLength(prompt_tokens), FixedLength(output_tokens))
    arrivals = StepArrivals(rate_rps, phases_s[0], factor)
    return synthesize(arrivals, lengths, duration_s=phases_s[0] + phases_s[1], seed=seed,
                      name=f"step {rate_rps:g}->{factor * rate_rps:g} req/s at {phases_s[0]:g} s")
