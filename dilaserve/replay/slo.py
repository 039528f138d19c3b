"""Per-request deadlines: ``slo_scale`` times the request's latency alone on an idle replica.

The idle latency comes from a ``BaselineLatency``: any callable ``(prompt_tokens,
output_tokens) -> seconds`` (the cost model's prediction, or a ``LinearLatency`` fitted to a
few requests timed one at a time with ``fit_linear_latency``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

BaselineLatency = Callable[[int, int], float]


@dataclass(frozen=True)
class LinearLatency:
    """``base_s + prompt_token_s * prompt_tokens + output_token_s * output_tokens`` seconds."""

    base_s: float
    prompt_token_s: float = 0.0
    output_token_s: float = 0.0

    def __call__(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.base_s + self.prompt_token_s * prompt_tokens + self.output_token_s * output_tokens


def deadline_s(baseline: BaselineLatency | None, slo_scale: float, prompt_tokens: int, output_tokens: int) -> float | None:
    """The end-to-end budget of one request, from its arrival (None without a baseline)."""
    if baseline is None:
        return None
    return slo_scale * baseline(prompt_tokens, output_tokens)


def fit_linear_latency(samples: Sequence[tuple[int, int, float]]) -> LinearLatency:
    """Least-squares ``LinearLatency`` through ``(prompt_tokens, output_tokens, seconds)`` samples.

    Coefficients are kept non-negative: a column that would come out negative (noise, or a
    length that did not vary) is dropped and the rest refitted.
    """
    import numpy as np

    if not samples:
        raise ValueError("fit_linear_latency needs at least one sample")
    data = np.asarray(samples, dtype=float)
    columns = [0, 1, 2]  # intercept, prompt, output
    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    while True:
        coef, *_ = np.linalg.lstsq(design[:, columns], data[:, 2], rcond=None)
        negative = [c for c, v in zip(columns, coef) if v < 0 and c != 0]
        if not negative:
            break
        columns.remove(negative[0])
    values = dict(zip(columns, coef.tolist()))
    return LinearLatency(max(0.0, values.get(0, 0.0)), values.get(1, 0.0), values.get(2, 0.0))
