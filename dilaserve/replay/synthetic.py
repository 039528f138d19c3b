"""Synthetic traces: an arrival process times a length model, from a seed.

Arrival processes (all start at t = 0):

- ``PoissonArrivals(rate_rps)``: exponential gaps, coefficient of variation (CV) 1.
- ``GammaArrivals(rate_rps, cv)``: Gamma gaps with shape ``1 / cv**2``; ``cv > 1`` is burstier
  than Poisson, ``cv < 1`` smoother, ``cv = 1`` is Poisson.
- ``OnOffArrivals(on_rate_rps, mean_on_s, mean_off_s, off_rate_rps)``: alternating on and off
  periods of exponential length (on first), Poisson within each.

Length models give (prompt, output) pairs: ``IndependentLengths(prompt, output)`` from two
distributions (``FixedLength``, ``UniformLength``, ``LogNormalLength`` fitted to a mean and
a CV, ``EmpiricalLength``), or ``ResampledLengths`` drawing whole pairs from a real trace so
that the correlation between prompt and answer lengths is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from dilaserve.replay.trace import Trace, TraceRequest


# -- arrivals ------------------------------------------------------------------------------
class ArrivalProcess(Protocol):
    @property
    def mean_rate_rps(self) -> float: ...

    def sample(self, rng: np.random.Generator, *, num_requests: int | None = None,
               duration_s: float | None = None) -> np.ndarray:
        """Sorted arrival times in seconds: ``num_requests`` of them, or all before ``duration_s``."""
        ...


def _check_bounds(num_requests: int | None, duration_s: float | None) -> None:
    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests and duration_s")
    if num_requests is not None and num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if duration_s is not None and not duration_s >= 0:
        raise ValueError("duration_s must be >= 0")


@dataclass(frozen=True)
class _RenewalArrivals:
    """Arrivals whose gaps are independent draws; the first request arrives at 0."""

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, *, num_requests: int | None = None,
               duration_s: float | None = None) -> np.ndarray:
        _check_bounds(num_requests, duration_s)
        if num_requests is not None:
            if num_requests == 0:
                return np.zeros(0)
            return np.concatenate(([0.0], np.cumsum(self._gaps(rng, num_requests - 1))))
        times = [np.zeros(1)]
        last = 0.0
        batch = max(16, int(duration_s * self.mean_rate_rps * 1.1))
        while last < duration_s:
            chunk = last + np.cumsum(self._gaps(rng, batch))
            times.append(chunk)
            last = float(chunk[-1])
        arrivals = np.concatenate(times)
        return arrivals[arrivals < duration_s]


@dataclass(frozen=True)
class PoissonArrivals(_RenewalArrivals):
    rate_rps: float

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps}")

    @property
    def mean_rate_rps(self) -> float:
        return self.rate_rps

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0 / self.rate_rps, n)


@dataclass(frozen=True)
class GammaArrivals(_RenewalArrivals):
    """Gamma-distributed gaps with mean ``1 / rate_rps`` and coefficient of variation ``cv``."""

    rate_rps: float
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not (self.rate_rps > 0 and self.cv > 0):
            raise ValueError(f"rate_rps and cv must be > 0, got {self.rate_rps}, {self.cv}")

    @property
    def mean_rate_rps(self) -> float:
        return self.rate_rps

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / (self.rate_rps * shape), n)


@dataclass(frozen=True)
class OnOffArrivals:
    """Bursts: on periods at ``on_rate_rps``, off periods at ``off_rate_rps`` (0: silence)."""

    on_rate_rps: float
    mean_on_s: float
    mean_off_s: float
    off_rate_rps: float = 0.0

    def __post_init__(self) -> None:
        if not (self.on_rate_rps > 0 and self.mean_on_s > 0 and self.mean_off_s >= 0 and self.off_rate_rps >= 0):
            raise ValueError("on_rate_rps and mean_on_s must be > 0; mean_off_s and off_rate_rps >= 0")

    @property
    def mean_rate_rps(self) -> float:
        busy = self.on_rate_rps * self.mean_on_s + self.off_rate_rps * self.mean_off_s
        return busy / (self.mean_on_s + self.mean_off_s)

    def sample(self, rng: np.random.Generator, *, num_requests: int | None = None,
               duration_s: float | None = None) -> np.ndarray:
        _check_bounds(num_requests, duration_s)
        chunks: list[np.ndarray] = []
        count, t, is_on = 0, 0.0, True
        while True:
            if num_requests is not None and count >= num_requests:
                break
            if duration_s is not None and t >= duration_s:
                break
            mean = self.mean_on_s if is_on else self.mean_off_s
            length = rng.exponential(mean) if mean > 0 else 0.0
            rate = self.on_rate_rps if is_on else self.off_rate_rps
            n = rng.poisson(rate * length) if rate > 0 else 0
            if n:
                chunks.append(t + np.sort(rng.uniform(0.0, length, n)))
                count += n
            t += length
            is_on = not is_on
        arrivals = np.concatenate(chunks) if chunks else np.zeros(0)
        if num_requests is not None:
            arrivals = arrivals[:num_requests]
        else:
            arrivals = arrivals[arrivals < duration_s]
        return arrivals


# -- lengths -------------------------------------------------------------------------------
class LengthDistribution(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` token counts (int64, each >= 1)."""
        ...


@dataclass(frozen=True)
class FixedLength:
    tokens: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, max(1, self.tokens), dtype=np.int64)


@dataclass(frozen=True)
class UniformLength:
    """Uniform over ``low..high`` inclusive."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got {self.low}, {self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, n, dtype=np.int64)


def lognormal_params(mean: float, cv: float) -> tuple[float, float]:
    """``(mu, sigma)`` of the log-normal with this mean and coefficient of variation."""
    sigma2 = math.log1p(cv * cv)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


@dataclass(frozen=True)
class LogNormalLength:
    """Log-normal fitted to ``mean`` tokens and coefficient of variation ``cv``, rounded and
    clipped to ``[min_tokens, max_tokens]`` (clipping moves the mean a little)."""

    mean: float
    cv: float
    min_tokens: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not (self.mean > 0 and self.cv >= 0):
            raise ValueError(f"mean must be > 0 and cv >= 0, got {self.mean}, {self.cv}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu, sigma = lognormal_params(self.mean, self.cv)
        values = np.rint(rng.lognormal(mu, sigma, n)).astype(np.int64)
        return np.clip(values, max(1, self.min_tokens), self.max_tokens)


@dataclass(frozen=True)
class EmpiricalLength:
    """Draws (with replacement) from observed counts."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("EmpiricalLength needs at least one value")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.maximum(1, np.asarray(self.values, dtype=np.int64)[rng.integers(0, len(self.values), n)])


class LengthModel(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (prompt tokens, output tokens) pairs as two int arrays."""
        ...


@dataclass(frozen=True)
class IndependentLengths:
    prompt: LengthDistribution
    output: LengthDistribution

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.prompt.sample(rng, n), self.output.sample(rng, n)


@dataclass(frozen=True)
class ResampledLengths:
    """Whole (prompt, output) pairs drawn with replacement from a trace."""

    pairs: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("ResampledLengths needs at least one pair")

    @classmethod
    def from_trace(cls, trace: Trace) -> ResampledLengths:
        return cls(tuple((r.prompt_tokens, r.output_tokens) for r in trace))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        table = np.asarray(self.pairs, dtype=np.int64)
        rows = table[rng.integers(0, len(table), n)]
        return rows[:, 0].copy(), rows[:, 1].copy()


def synthesize(
    arrivals: ArrivalProcess, lengths: LengthModel, *, num_requests: int | None = None,
    duration_s: float | None = None, seed: int = 0, name: str = "synthetic",
) -> Trace:
    """A trace of ``num_requests`` arrivals, or of all arrivals before ``duration_s``."""
    rng = np.random.default_rng(seed)
    times = arrivals.sample(rng, num_requests=num_requests, duration_s=duration_s)
    prompts, outputs = lengths.sample(rng, len(times))
    # tolist() gives Python floats and ints: no per-element conversion needed.
    return Trace(tuple(map(TraceRequest._make, zip(times.tolist(), prompts.tolist(), outputs.tolist()))), name=name)


def interarrival_cv(arrival_s: Sequence[float]) -> float:
    """Coefficient of variation of the gaps between consecutive arrivals (burstiness)."""
    gaps = np.diff(np.asarray(arrival_s, dtype=float))
    return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else 0.0
