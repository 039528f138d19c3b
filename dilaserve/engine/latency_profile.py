"""Latency profiles: measured step times, the step cost fitted to them, and what is derived.

``dilaserve profile latency`` times real engine steps (``profiling.py``) over a grid of batch
sizes, chunk sizes, context lengths and phases and writes one JSON file:

    {"kind": "latency", "model": ..., "device": ..., "dtype": ..., "cache": "dual",
     "points": [{"phase": "reuse", "batch_size": 4, "chunk": 8, "context": 512,
                 "shape": {"tokens": .., "context_tokens": .., "pairs": .., "queries": ..,
                           "requests": .., "refresh_tokens": ..}, "seconds": .., "samples": [..]}],
     "fit": {"fixed_s": .., "per_token_s": .., ...},           # StepCost, all terms
     "holdout": {"median_rel_error": .., "max_rel_error": .., "num_train": .., "num_test": ..},
     "fit_3term": {...}, "holdout_3term": {...},              # the online model's form, for comparison
     "degrees": [{"degree": 1, "fixed_s": .., "per_token_s": .., "per_context_s": ..,
                  "max_running": .., "kv_capacity_tokens": ..}]}   # the planner's format

The fit minimises *relative* error (rows weighted by 1 / measured seconds) under non-negative
coefficients, on a training subset; the held-out points measure how well the fitted form
predicts steps it has not seen. ``degrees`` makes the file a planner latency profile too
(``planner.profiles.load_latency_profile``), with the three-term fit the planner prices.

Torch-free: the scheduler and chunk controller read profiles through this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dilaserve.engine.cost_model import COST_TERMS, OnlineCostModel, StepCost, StepShape

THREE_TERMS = ("fixed_s", "per_token_s", "per_context_s")
PHASES = ("refresh", "reuse", "mixed")


@dataclass(frozen=True)
class LatencyPoint:
    """One grid point: the step's shape and its measured seconds (median of ``samples``)."""

    phase: str  # "refresh", "reuse" or "mixed" (a share of the batch refreshing)
    batch_size: int  # requests in the step
    chunk: int  # positions queried per request
    context: int  # sequence length of each request (keys read per request), tokens
    shape: StepShape
    seconds: float
    samples: tuple[float, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "batch_size": self.batch_size, "chunk": self.chunk, "context": self.context,
                "shape": asdict(self.shape), "seconds": self.seconds, "samples": list(self.samples)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "LatencyPoint":
        return cls(row["phase"], int(row["batch_size"]), int(row["chunk"]), int(row["context"]),
                   StepShape(**row["shape"]), float(row["seconds"]), tuple(row.get("samples", ())))


# -- fitting ------------------------------------------------------------------------------------
def fit_step_cost(points: Sequence[LatencyPoint], terms: Sequence[str] = COST_TERMS) -> StepCost:
    """Non-negative least squares of ``seconds`` on the shapes' features, in relative error.

    Only ``terms`` are fitted (the rest are 0). Columns are scaled to unit maximum before the
    solve so that pairs (~1e7) and the fixed term (1) are conditioned alike."""
    from scipy.optimize import nnls

    if not points:
        raise ValueError("no latency points to fit")
    idx = [COST_TERMS.index(t) for t in terms]
    design = np.array([[p.shape.features()[i] for i in idx] for p in points], dtype=np.float64)
    target = np.array([p.seconds for p in points], dtype=np.float64)
    weight = 1.0 / np.maximum(target, 1e-12)
    scale = np.max(np.abs(design), axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(design / scale * weight[:, None], target * weight)
    values = dict.fromkeys(COST_TERMS, 0.0)
    for name, c, s in zip(terms, coef, scale):
        values[name] = float(c / s)
    return StepCost(**values)


def relative_errors(cost: StepCost, points: Sequence[LatencyPoint]) -> np.ndarray:
    """|predicted - measured| / measured for each point."""
    return np.array([abs(cost.shape_s(p.shape) - p.seconds) / p.seconds for p in points], dtype=np.float64)


def error_summary(cost: StepCost, points: Sequence[LatencyPoint]) -> dict[str, float]:
    errors = relative_errors(cost, points)
    if errors.size == 0:
        return {"median_rel_error": math.nan, "max_rel_error": math.nan, "num": 0}
    return {"median_rel_error": float(np.median(errors)), "max_rel_error": float(np.max(errors)),
            "num": int(errors.size)}


def holdout_split(points: Sequence[LatencyPoint], test_fraction: float = 0.25, seed: int = 0
                  ) -> tuple[list[LatencyPoint], list[LatencyPoint]]:
    """A seeded random split into (train, test); both get at least one point when there are two."""
    n = len(points)
    order = np.random.default_rng(seed).permutation(n)
    num_test = min(max(1, round(n * test_fraction)), n - 1) if n > 1 else 0
    test = set(order[:num_test].tolist())
    return [p for i, p in enumerate(points) if i not in test], [p for i, p in enumerate(points) if i in test]


def fit_with_holdout(points: Sequence[LatencyPoint], terms: Sequence[str] = COST_TERMS, test_fraction: float = 0.25,
                     seed: int = 0) -> tuple[StepCost, dict[str, float]]:
    """Fits on the training split and reports the error on the held-out one."""
    train, test = holdout_split(points, test_fraction, seed)
    cost = fit_step_cost(train, terms)
    summary = error_summary(cost, test)
    return cost, {**summary, "num_train": len(train), "num_test": len(test), "test_fraction": test_fraction,
                  "seed": seed, "train_median_rel_error": error_summary(cost, train)["median_rel_error"]}


# -- files ---------------------------------------------------------------------------------------
def profile_dict(points: Sequence[LatencyPoint], meta: dict[str, Any], *, max_running: int = 256,
                 kv_capacity_tokens: int = 1, test_fraction: float = 0.25, seed: int = 0,
                 degree: int = 1) -> dict[str, Any]:
    """The profile file's content: points, the full and three-term fits, their held-out errors,
    and the planner's ``degrees`` entry. The ``fit`` coefficients are refitted on all points
    after the held-out check (the check says how good the form is; all data fit it best)."""
    _, holdout = fit_with_holdout(points, COST_TERMS, test_fraction, seed)
    _, holdout3 = fit_with_holdout(points, THREE_TERMS, test_fraction, seed)
    full, three = fit_step_cost(points, COST_TERMS), fit_step_cost(points, THREE_TERMS)
    return {
        "kind": "latency", **meta, "illustrative": False,
        "points": [p.to_dict() for p in points],
        "fit": asdict(full), "holdout": holdout,
        "fit_3term": {k: getattr(three, k) for k in THREE_TERMS}, "holdout_3term": holdout3,
        "degrees": [{"degree": degree, **{k: getattr(three, k) for k in THREE_TERMS},
                     "max_running": max_running, "kv_capacity_tokens": max(1, int(kv_capacity_tokens))}],
    }


def save_profile(profile: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    return path


def load_points(path: str | Path) -> list[LatencyPoint]:
    return [LatencyPoint.from_dict(row) for row in json.loads(Path(path).read_text())["points"]]


def load_step_cost(path: str | Path) -> StepCost:
    """The profile's ``fit`` (all terms); a planner-style file without one gives its degree-1
    three-term cost."""
    data = json.loads(Path(path).read_text())
    if "fit" in data:
        return StepCost(**{k: float(data["fit"].get(k, 0.0)) for k in COST_TERMS})
    degree1 = next((d for d in data.get("degrees", []) if d.get("degree") == 1), None)
    if degree1 is None:
        raise ValueError(f"{path}: neither a 'fit' nor a degree-1 entry")
    return StepCost(**{k: float(degree1[k]) for k in THREE_TERMS})


class ProfiledCost:
    """The engine's cost model when a measured profile is given: the profile's ``StepCost``,
    not refitted online (the online fit has only three terms and would drop the others). It
    keeps the recent relative error of its predictions, for reports."""

    measured = True  # priced from measurements from the first step (no calibration wait)

    def __init__(self, cost: StepCost, window: int = 256):
        self.cost = cost
        self._errors: list[float] = []
        self._window = window
        self.num_observed = 0

    def observe(self, tokens: int, context_tokens: int, seconds: float) -> None:
        self.num_observed += 1
        if seconds > 0:
            self._errors.append(abs(self.cost.step_s(tokens, context_tokens) - seconds) / seconds)
            del self._errors[:-self._window]

    def recent_rel_error(self) -> float:
        return float(np.median(self._errors)) if self._errors else math.nan


def engine_cost_model(latency_profile: str | None, prior: StepCost | None = None):
    """The engine's cost model: a measured profile's (``ProfiledCost``) when one is named, else
    the online fit starting from ``prior``."""
    if latency_profile:
        return ProfiledCost(load_step_cost(latency_profile))
    return OnlineCostModel(prior=prior)


# -- what the scheduler derives ------------------------------------------------------------------
def refresh_token_bound(cost: StepCost, reuse: StepShape, seq_len: int, slowdown: float) -> int:
    """The most refresh tokens a step may add to its reuse part ``reuse`` so that it takes at
    most ``(1 + slowdown)`` times as long as the reuse part alone (phase-mixed batching).

    A refresh token of a ``seq_len`` sequence costs ``per_token_s + per_pair_s * seq_len`` plus
    ``per_context_s * seq_len`` and the per-request terms once per ``seq_len`` tokens."""
    base = cost.shape_s(reuse)
    per_request = cost.per_context_s * seq_len + cost.per_request_s + cost.per_query_s
    per_token = cost.per_token_s + cost.per_pair_s * seq_len + per_request / max(seq_len, 1)
    if per_token <= 0:
        return 1 << 30
    return max(0, int(slowdown * base / per_token))
