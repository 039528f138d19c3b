"""The per-step cost model: step time from the batch's shape, and request latency from it.

    step_s = fixed_s + per_token_s * tokens_computed + per_context_s * context_tokens_read
             [+ per_pair_s * query_key_pairs + per_query_s * queried_rows + per_request_s * requests]

``tokens_computed`` counts token-forwards (refresh steps compute whole sequences, reuse steps
only their window); ``context_tokens_read`` counts keys and values attended. The bracketed
terms are what a measured latency profile adds (``latency_profile.py``; 0 otherwise):
attention work (each computed token against each key it reads), the LM head over queried rows
(the logit budget), and per-request host work; together they tell a refresh step from a reuse
step of the same token count. The coefficients
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

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np


COST_TERMS = ("fixed_s", "per_token_s", "per_context_s", "per_pair_s", "per_query_s", "per_request_s")


@dataclass(frozen=True)
class StepShape:
    """What a step's cost depends on (``StepCost.shape_s``): token-forwards, keys read, query-key
    pairs (sum over requests of tokens x keys), queried rows (logits), requests; and how many
    of the tokens are refresh tokens (for reports: the phase mix)."""

    tokens: int
    context_tokens: int
    pairs: int = 0
    queries: int = 0
    requests: int = 0
    refresh_tokens: int = 0

    @classmethod
    def from_plan(cls, plan) -> "StepShape":
        """The shape of a ``StepPlan``."""
        items = plan.items
        return cls(plan.num_tokens, plan.num_context_tokens,
                   sum(i.num_tokens * i.num_context_tokens for i in items), sum(len(i.query_positions) for i in items),
                   len(items), plan.num_refresh_tokens)

    def __add__(self, other: "StepShape") -> "StepShape":
        return StepShape(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.tokens, self.context_tokens, self.pairs, self.queries, self.requests, self.refresh_tokens)

    def features(self) -> tuple[float, ...]:
        """The inputs each of ``COST_TERMS`` multiplies."""
        return (1.0, self.tokens, self.context_tokens, self.pairs, self.queries, self.requests)


@dataclass(frozen=True)
class StepCost:
    fixed_s: float = 2e-3
    per_token_s: float = 2e-5
    per_context_s: float = 1e-7
    per_pair_s: float = 0.0  # per query-key pair (attention compute)
    per_query_s: float = 0.0  # per queried row (LM head / logit budget)
    per_request_s: float = 0.0  # per request in the batch (host-side work)

    def step_s(self, tokens: int, context_tokens: int, pairs: int = 0, queries: int = 0, requests: int = 0) -> float:
        return (self.fixed_s + self.per_token_s * tokens + self.per_context_s * context_tokens
                + self.per_pair_s * pairs + self.per_query_s * queries + self.per_request_s * requests)

    def shape_s(self, shape: StepShape) -> float:
        return self.step_s(shape.tokens, shape.context_tokens, shape.pairs, shape.queries, shape.requests)

    def coefficients(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in COST_TERMS)

    @classmethod
    def from_profile(cls, path) -> "StepCost":
        """The fitted step cost of a latency profile (``dilaserve profile latency`` JSON)."""
        from dilaserve.engine.latency_profile import load_step_cost

        return load_step_cost(path)


class OnlineCostModel:
    """Refits ``StepCost`` from recent (tokens, context, seconds) observations."""

    measured = False  # starts from a prior: calibrated only after enough of its own steps

    def __init__(self, prior: StepCost | None = None, window: int = 512, refit_every: int = 16):
        self.cost = prior or StepCost()
        self._obs: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        self._num_observed = 0

    @property
    def num_observed(self) -> int:
        return self._num_observed

    def observe(self, tokens: int, context_tokens: int, seconds: float) -> None:
        self._num_observed += 1
        self._obs.append((tokens, context_tokens, seconds))
        self._since_fit += 1
        if self._since_fit >= self._refit_every and len(self._obs) >= 8:
            self._refit()

    def _refit(self) -> None:
        """Non-negative least squares over the window.

        A term whose input barely varies in the window (every step the same size, say) cannot
        be told apart from the fixed term; it keeps its current coefficient rather than being
        guessed, so a fresh replica's first few alike steps do not yield a model that is
        right only for them.
        """
        self._since_fit = 0
        data = np.array(self._obs, dtype=np.float64)
        inputs, seconds = data[:, :2], data[:, 2].copy()
        current = (self.cost.per_token_s, self.cost.per_context_s)
        varies = [float(np.std(col)) > 0.05 * max(float(np.mean(col)), 1.0) for col in inputs.T]
        for j in range(2):
            if not varies[j]:
                seconds -= current[j] * inputs[:, j]
        free = [j for j in range(2) if varies[j]]
        coef = _nonnegative_lstsq(np.column_stack([np.ones(len(data))] + [inputs[:, j] for j in free]), seconds)
        fixed, rates = coef[0], dict(zip(free, coef[1:]))
        per_token, per_ctx = (rates.get(j, current[j]) for j in range(2))
        if fixed + per_token + per_ctx > 0:
            self.cost = StepCost(fixed, per_token, per_ctx)


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray) -> list[float]:
    """argmin ||design @ x - target|| over x >= 0, exactly, for the few columns used here:
    the best unconstrained fit over every subset of columns whose coefficients come out
    non-negative (the others held at zero)."""
    n = design.shape[1]
    best, best_err = [0.0] * n, float(np.sum(target ** 2))
    for mask in range(1, 1 << n):
        cols = [j for j in range(n) if mask >> j & 1]
        sub, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
        if np.any(sub < 0):
            continue
        err = float(np.sum((design[:, cols] @ sub - target) ** 2))
        if err < best_err:
            best, best_err = [0.0] * n, err
            for j, c in zip(cols, sub):
                best[j] = float(c)
    return best


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
    """What decoding the rest of a request costs: steps, token-forwards, keys read, and the
    terms only a measured profile prices (query-key pairs, queried rows)."""

    steps: float
    tokens: float
    context_tokens: float
    pairs: float = 0.0
    queries: float = 0.0


def request_work(seq_len: int, remaining: int, block_size: int, tokens_per_step: float, cache: str,
                 kv_retention: float | None = None) -> Work:
    """Work to decide the last ``remaining`` positions of a ``seq_len`` sequence: per block one
    refresh of the whole sequence, then reuse steps over the block (dual), block + suffix
    (prefix) or the whole sequence (none). With sparse KV (``kv_retention``, dual cache) a
    reuse step reads the kept share of the positions outside the block, and the block."""
    if cache == "exact":
        return _exact_work(seq_len, remaining, block_size, tokens_per_step)
    if kv_retention is None:
        steps = tokens = queries = 0.0
        while remaining > 0:
            block = min(block_size, remaining)
            block_steps = max(1, int(np.ceil(block / tokens_per_step)))
            reuse = {"none": seq_len, "prefix": remaining}.get(cache, block)
            steps += block_steps
            tokens += seq_len + (block_steps - 1) * reuse
            queries += _block_queries(block, block_steps, tokens_per_step)
            remaining -= block
        return Work(steps, tokens, steps * seq_len, tokens * seq_len, queries)
    steps = tokens = context = pairs = queries = 0.0
    while remaining > 0:
        block = min(block_size, remaining)
        block_steps = max(1, int(np.ceil(block / tokens_per_step)))
        read = block + float(np.ceil(kv_retention * (seq_len - block)))  # keys of a reuse step
        steps += block_steps
        tokens += seq_len + (block_steps - 1) * block
        context += seq_len + (block_steps - 1) * read
        pairs += seq_len * seq_len + (block_steps - 1) * block * read
        queries += _block_queries(block, block_steps, tokens_per_step)
        remaining -= block
    return Work(steps, tokens, context, pairs, queries)


class BlockPace:
    """How many steps a block takes, learned from the engine's own blocks: for a request
    ``done`` steps into a block, the mean of ``S - done`` over recent blocks that took
    ``S > done`` steps (at the same threshold and block size).

    Tokens decided per step is a mean over whole blocks; a request part-way through a block
    is not a mean block. Blocks differ widely (on the tiny random LLaDA at threshold 0.9, a
    first block often goes in 3-5 steps and a second takes 25-31), so a block that has run
    6 steps is most likely a slow one: counting its masked positions at the mean rate said
    13 steps were left where 25 were. Conditioning on the steps already taken is what the
    finish predictions of running requests need (admission checks them against their
    deadlines whenever a newcomer would join)."""

    def __init__(self, window: int = 512, min_samples: int = 16):
        self.min_samples = min_samples
        self._blocks: dict[tuple[float, int], deque[int]] = {}
        self._sorted: dict[tuple[float, int], tuple[list[int], list[int]]] = {}  # key -> (steps, suffix sums)
        self._window = window

    @staticmethod
    def _key(threshold: float, block_size: int) -> tuple[float, int]:
        return (round(threshold, 3), block_size)

    def observe(self, threshold: float, block_size: int, steps: int) -> None:
        key = self._key(threshold, block_size)
        self._blocks.setdefault(key, deque(maxlen=self._window)).append(steps)
        self._sorted.pop(key, None)

    def remaining(self, threshold: float, block_size: int, done: int) -> float | None:
        """Expected steps left in a block after ``done``; None with too few blocks seen that
        lasted longer (the caller then counts masked positions)."""
        key = self._key(threshold, block_size)
        if key not in self._sorted:
            ordered = sorted(self._blocks.get(key, ()))
            suffix = [0] * (len(ordered) + 1)
            for i in range(len(ordered) - 1, -1, -1):
                suffix[i] = suffix[i + 1] + ordered[i]
            self._sorted[key] = (ordered, suffix)
        ordered, suffix = self._sorted[key]
        first = bisect.bisect_right(ordered, done)
        longer = len(ordered) - first
        return (suffix[first] - done * longer) / longer if longer >= self.min_samples else None


def with_block_steps(work: Work, counted: float, expected: float) -> Work:
    """``work`` with its current block's ``counted`` steps replaced by ``expected`` ones
    (``BlockPace``); the steps added or removed are priced as the work's mean step."""
    if work.steps <= 0 or expected == counted:
        return work
    steps = max(1.0, work.steps - counted + expected)
    grow = steps / work.steps
    return Work(steps, work.tokens * grow, work.context_tokens * grow, work.pairs * grow, work.queries * grow)


def _block_queries(block: int, block_steps: int, tokens_per_step: float) -> float:
    """Rows a whole-block query set computes logits for over a block: the still-masked ones."""
    return sum(max(block - k * tokens_per_step, 1.0) for k in range(block_steps))


def _exact_work(seq_len: int, remaining: int, block_size: int, tokens_per_step: float) -> Work:
    """Block-causal exact cache: per block, steps x block tokens plus the previous block's
    recomputation on its first step (the prompt's prefill for the first block); attention reads
    the sequence up to the block's end."""
    steps = tokens = context = pairs = queries = 0.0
    done = seq_len - remaining  # the prompt (or what is decided) before the first block
    previous = done
    while remaining > 0:
        block = min(block_size, remaining)
        block_steps = max(1, int(np.ceil(block / tokens_per_step)))
        end = done + block
        steps += block_steps
        tokens += block_steps * block + previous
        context += block_steps * end
        pairs += (block_steps * block + previous) * end
        queries += _block_queries(block, block_steps, tokens_per_step)
        previous, done, remaining = block, end, remaining - block
    return Work(steps, tokens, context, pairs, queries)


def work_s(cost: StepCost, work: Work) -> float:
    """Seconds for one request's work when it runs alone."""
    return (cost.fixed_s * work.steps + cost.per_token_s * work.tokens + cost.per_context_s * work.context_tokens
            + cost.per_pair_s * work.pairs + cost.per_query_s * work.queries + cost.per_request_s * work.steps)


def batch_work_s(cost: StepCost, works: list[Work]) -> float:
    """Seconds for many requests' work run together: steps overlap (the fixed per-step cost is
    paid once per step of the longest), token and attention work add up."""
    if not works:
        return 0.0
    return (cost.fixed_s * max(w.steps for w in works) + cost.per_token_s * sum(w.tokens for w in works)
            + cost.per_context_s * sum(w.context_tokens for w in works) + cost.per_pair_s * sum(w.pairs for w in works)
            + cost.per_query_s * sum(w.queries for w in works) + cost.per_request_s * sum(w.steps for w in works))


def batch_finish_s(cost: StepCost, works: list[Work]) -> np.ndarray:
    """Seconds until each of ``works`` finishes when all run batched together from now.

    Work ``j`` pays the fixed cost of each of its own steps, and of every work ``i`` the share
    done while ``j`` runs: all of it if ``i`` has no more steps than ``j``, else
    ``steps_j / steps_i`` of it (each work spread evenly over its steps). The last to finish
    takes ``batch_work_s``; a short request among long ones finishes long before that.
    """
    if not works:
        return np.zeros(0)
    steps = np.array([max(w.steps, 1e-9) for w in works])
    step_work = np.array([cost.per_token_s * w.tokens + cost.per_context_s * w.context_tokens for w in works])
    overlap = np.minimum(1.0, steps[:, None] / steps[None, :])  # [j, i]: share of i's work done during j
    return cost.fixed_s * steps + overlap @ step_work


class TokensPerStepEstimator:
    """Tokens decided per step for each threshold, learned from the engine's own steps.

    A threshold with ``min_samples`` observations (measured or seeded) answers from them. An
    unseen threshold answers from its measured neighbours, since a lower threshold decides at
    least as many tokens per step as a higher one: between two known thresholds, linear
    interpolation; beyond the known range, the nearest known threshold's; with nothing known,
    the generic prior (``expected_tokens_per_step``). Priced by the generic prior, a threshold
    a replica has never run (one the controller just pushed) can look several times too slow
    for the model at hand; admission would then refuse everything at that threshold, and it
    would never be measured.
    """

    def __init__(self, min_samples: int = 32):
        self.min_samples = min_samples
        self._sums: dict[float, list[float]] = {}

    @staticmethod
    def _key(threshold: float) -> float:
        return round(threshold, 3)

    def seed(self, threshold: float, tokens_per_step: float, weight: int | None = None) -> None:
        """A prior measurement (a quality profile's tokens per step) worth ``weight`` steps
        (default ``min_samples``: it answers at once and live steps soon outweigh it)."""
        weight = self.min_samples if weight is None else weight
        self._sums[self._key(threshold)] = [tokens_per_step * weight, float(weight)]

    def seed_from_profile(self, entries, block_size: int) -> int:
        """Seeds every threshold of a quality profile measured at ``block_size`` with the whole
        block as the chunk; returns how many were seeded."""
        seeded = 0
        for e in entries:
            threshold, chunk = e.get("threshold"), e.get("chunk")
            if threshold is None or e.get("steps") or (chunk not in (None, block_size)):
                continue
            self.seed(float(threshold), float(e["tokens_per_step"]))
            seeded += 1
        return seeded

    def observe(self, threshold: float, decided: int) -> None:
        entry = self._sums.setdefault(self._key(threshold), [0.0, 0.0])
        entry[0] += decided
        entry[1] += 1

    def known(self) -> dict[float, float]:
        """Thresholds with enough observations, and their mean tokens per step."""
        return {t: max(1.0, s / n) for t, (s, n) in self._sums.items() if n >= self.min_samples}

    def estimate(self, threshold: float | None, block_size: int) -> float:
        prior = expected_tokens_per_step(threshold, block_size, None)
        if threshold is None:
            return prior
        known = self.known()
        key = self._key(threshold)
        if key in known:
            return known[key]
        higher = [t for t in known if t > key]  # stricter: decide no more than this one
        lower = [t for t in known if t < key]  # looser: decide at least as many
        if higher and lower:
            hi, lo = min(higher), max(lower)
            w = (key - lo) / (hi - lo)
            return known[lo] + w * (known[hi] - known[lo])
        if higher or lower:
            return known[min(higher)] if higher else known[max(lower)]
        return prior
