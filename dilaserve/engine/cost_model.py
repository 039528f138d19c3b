"""The per-step cost model: step time from the batch's shape, and request latency from it.

    step_s = fixed_s + per_token_s * tokens_computed + per_context_s * context_tokens_read

``tokens_computed`` counts token-forwards (refresh steps compute whole sequences, reuse steps
only their window); ``context_tokens_read`` counts keys and values attended. The coefficients
come from a latency profile on GPUs, or are fitted online from the engine's own steps (least
squares over a sliding window) when no profile exists, as on CPU. A request's predicted
latency walks its blocks: one refresh step, then reuse steps until the block is decided at the
expected tokens decided per step for its threshold.

Block-causal models with the exact cache (SDAR) have no refresh: every step computes one block
(a block's first step also recomputes the block before it, whose keys and values become final;
a request's first step also prefills its prompt), so tokens computed per step do not grow with
the context; per-step cost grows with context only through attention (``context_tokens_read``
is the sequence up to the current block).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepCost:
    fixed_s: float = 2e-3
    per_token_s: float = 2e-5
    per_context_s: float = 1e-7

    def step_s(self, tokens: int, context_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens + self.per_context_s * context_tokens


class OnlineCostModel:
    """Refits ``StepCost`` from recent (tokens, context, seconds) observations."""

    def __init__(self, prior: StepCost | None = None, window: int = 512, refit_every: int = 16):
        self.cost = prior or StepCost()
        self._obs: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0

    def observe(self, tokens: int, context_tokens: int, seconds: float) -> None:
        self._obs.append((tokens, context_tokens, seconds))
        self._since_fit += 1
        if self._since_fit >= self._refit_every and len(self._obs) >= 8:
            self._refit()

    def _refit(self) -> None:
        self._since_fit = 0
        data = np.array(self._obs, dtype=np.float64)
        design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
        coef, *_ = np.linalg.lstsq(design, data[:, 2], rcond=None)
        # Costs cannot be negative; a degenerate window (all steps alike) keeps the fixed term.
        fixed, per_token, per_ctx = (max(float(c), 0.0) for c in coef)
        if fixed + per_token + per_ctx > 0:
            self.cost = StepCost(fixed, per_token, per_ctx)


def expected_tokens_per_step(threshold: float | None, block_size: int, steps_per_block: int | None) -> float:
    """A prior for tokens decided per step when nothing has been measured yet.

    Fixed steps decide block/steps per step. Under a threshold, Fast-dLLM reports about 3 per
    step at 0.9 on a 32-block for LLaDA-8B; lower thresholds decide more. Engines replace this
    prior by what they observe.
    """
    if steps_per_block:
        return max(block_size / steps_per_block, 1.0)
    t = 0.9 if threshold is None else threshold
    return float(min(block_size, max(1.0, 1.0 + 20.0 * (1.0 - t))))


@dataclass(frozen=True)
class Work:
    """What decoding the rest of a request costs: steps, token-forwards, keys read."""

    steps: float
    tokens: float
    context_tokens: float


def request_work(seq_len: int, remaining: int, block_size: int, tokens_per_step: float, cache: str) -> Work:
    """Work to decide the last ``remaining`` positions of a ``seq_len`` sequence: per block one
    refresh of the whole sequence, then reuse steps over the block (dual), block + suffix
    (prefix) or the whole sequence (none)."""
    if cache == "exact":
        return _exact_work(seq_len, remaining, block_size, tokens_per_step)
    steps = tokens = 0.0
    while remaining > 0:
        block = min(block_size, remaining)
        block_steps = max(1, int(np.ceil(block / tokens_per_step)))
        reuse = {"none": seq_len, "prefix": remaining}.get(cache, block)
        steps += block_steps
        tokens += seq_len + (block_steps - 1) * reuse
        remaining -= block
    return Work(steps, tokens, steps * seq_len)


def _exact_work(seq_len: int, remaining: int, block_size: int, tokens_per_step: float) -> Work:
    """Block-causal exact cache: per block, steps x block tokens plus the previous block's
    recomputation on its first step (the prompt's prefill for the first block); attention reads
    the sequence up to the block's end."""
    steps = tokens = context = 0.0
    done = seq_len - remaining  # the prompt (or what is decided) before the first block
    previous = done
    while remaining > 0:
        block = min(block_size, remaining)
        block_steps = max(1, int(np.ceil(block / tokens_per_step)))
        end = done + block
        steps += block_steps
        tokens += block_steps * block + previous
        context += block_steps * end
        previous, done, remaining = block, end, remaining - block
    return Work(steps, tokens, context)


def work_s(cost: StepCost, work: Work) -> float:
    """Seconds for one request's work when it runs alone."""
    return cost.fixed_s * work.steps + cost.per_token_s * work.tokens + cost.per_context_s * work.context_tokens


def batch_work_s(cost: StepCost, works: list[Work]) -> float:
    """Seconds for many requests' work run together: steps overlap (the fixed per-step cost is
    paid once per step of the longest), token and attention work add up."""
    if not works:
        return 0.0
    return (cost.fixed_s * max(w.steps for w in works) + cost.per_token_s * sum(w.tokens for w in works)
            + cost.per_context_s * sum(w.context_tokens for w in works))


class TokensPerStepEstimator:
    """Tokens decided per step for each threshold, learned from the engine's own steps.

    Until a threshold has ``min_samples`` observations the prior (``expected_tokens_per_step``)
    answers; measured profiles can seed it through ``seed``.
    """

    def __init__(self, min_samples: int = 32):
        self.min_samples = min_samples
        self._sums: dict[float, list[float]] = {}

    @staticmethod
    def _key(threshold: float) -> float:
        return round(threshold, 3)

    def seed(self, threshold: float, tokens_per_step: float, weight: int = 1000) -> None:
        self._sums[self._key(threshold)] = [tokens_per_step * weight, float(weight)]

    def observe(self, threshold: float, decided: int) -> None:
        entry = self._sums.setdefault(self._key(threshold), [0.0, 0.0])
        entry[0] += decided
        entry[1] += 1

    def estimate(self, threshold: float | None, block_size: int) -> float:
        if threshold is not None:
            entry = self._sums.get(self._key(threshold))
            if entry and entry[1] >= self.min_samples:
                return max(1.0, entry[0] / entry[1])
        return expected_tokens_per_step(threshold, block_size, None)
