"""The acceptance model: how many queried positions a simulated step decides.

A real step commits every queried position whose confidence reaches the request's threshold
(at least one). The simulator replaces the model by this: a request at threshold ``t`` decides
``k = 1 + Poisson(lam - 1)`` positions per step, capped by the positions still masked.

``mean(t)`` is tokens decided per step as an engine observes it (decided positions over steps),
from a quality profile (``dilaserve profile quality`` measures exactly that) or, without one,
the cost model's prior ``expected_tokens_per_step`` (3 at threshold 0.9, as Fast-dLLM reports
for LLaDA-8B). The cap at the block's end makes the observed ratio lower than ``lam``, so
``lam`` is calibrated (exact expected steps per block, by dynamic programming) so that a full
block takes ``block_size / mean(t)`` steps on average: the engine's ``TokensPerStepEstimator``
then learns ``mean(t)``, as it would on the profiled model.
"""

from __future__ import annotations

import json
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dilaserve.engine.cost_model import expected_tokens_per_step


@dataclass(frozen=True)
class AcceptanceModel:
    # (threshold, mean tokens decided per step) pairs, sorted by threshold; empty: the prior.
    profile: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", tuple(sorted((float(t), float(m)) for t, m in self.profile)))
        if any(m < 1.0 for _, m in self.profile):
            raise ValueError("tokens decided per step must be >= 1")

    @classmethod
    def from_quality_profile(cls, path: str | Path, chunk: int | None = None) -> AcceptanceModel:
        """Reads the ``entries`` of a quality profile (threshold-decoded ones only).

        A profile may measure several chunk sizes at each threshold (``--chunks 32,8``), and a
        smaller chunk caps tokens per step. ``chunk`` keeps the entries of that chunk size;
        without it, full-block entries (no chunk, or chunk >= block size: what the engine's
        default fixed chunk control queries) when the profile has any, else all."""
        data = json.loads(Path(path).read_text())
        # Dense entries only: the simulated replicas do not model sparse KV.
        entries = [e for e in data.get("entries", []) if e.get("threshold") is not None and e.get("tokens_per_step")
                   and e.get("kv_retention") is None]
        if chunk is not None:
            entries = [e for e in entries if e.get("chunk") == chunk]
        else:
            full = [e for e in entries if e.get("chunk") is None
                    or e["chunk"] >= e.get("block_size", data.get("block_size", e["chunk"]))]
            entries = full or entries
        pairs = {}
        for entry in entries:
            pairs[float(entry["threshold"])] = max(1.0, float(entry["tokens_per_step"]))
        if not pairs:
            raise ValueError(f"{path}: no threshold-decoded entry with tokens_per_step")
        return cls(tuple(pairs.items()))

    def mean(self, threshold: float | None, block_size: int) -> float:
        """Mean tokens decided per step at ``threshold`` (interpolated linearly in the profile,
        clamped at its ends), never more than the block."""
        if not self.profile or threshold is None:
            return expected_tokens_per_step(threshold, block_size, None)
        thresholds = [t for t, _ in self.profile]
        means = [m for _, m in self.profile]
        return float(min(block_size, max(1.0, np.interp(threshold, thresholds, means))))

    def draw_parameter(self, threshold: float | None, block_size: int) -> float:
        """``lam`` of the per-step draw at ``threshold`` (see the module docstring)."""
        return calibrated_lam(self.mean(threshold, block_size), block_size)

    @staticmethod
    def draw(rng: np.random.Generator, lam: float, num_queried: int) -> int:
        """Positions one step decides: at least 1, at most ``num_queried``."""
        return min(num_queried, 1 + int(rng.poisson(lam - 1.0)))


def expected_steps(lam: float, num_positions: int) -> float:
    """Expected steps to decide ``num_positions`` positions when each step decides
    ``min(remaining, 1 + Poisson(lam - 1))``."""
    mu = lam - 1.0
    pmf = [math.exp(-mu)]  # P(K = 1 + j) for j = 0, 1, ...
    for j in range(1, num_positions):
        pmf.append(pmf[-1] * mu / j)
    steps = [0.0] * (num_positions + 1)
    for left in range(1, num_positions + 1):
        steps[left] = 1.0 + sum(pmf[k - 1] * steps[left - k] for k in range(1, left))
    return steps[num_positions]


@functools.lru_cache(maxsize=256)
def calibrated_lam(observed: float, block_size: int) -> float:
    """The ``lam`` whose full blocks take ``block_size / observed`` steps on average."""
    target = block_size / observed
    if observed <= 1.0:
        return 1.0
    if target <= 1.0 + 1e-9:
        return float(4 * block_size)  # decides the whole block in one step, almost surely
    low, high = 1.0, float(4 * block_size)
    for _ in range(60):
        mid = (low + high) / 2
        if expected_steps(mid, block_size) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2
