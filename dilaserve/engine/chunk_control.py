"""Chunk-size control: how many still-masked positions of its block a request queries per step.

A strategy sees the requests about to be scheduled and returns a chunk per request, within
each request's own bounds (``SamplingParams.chunk_bounds``); the scheduler reports back how
many positions each step decided (``observe``).

``FixedChunk`` ("fixed"): each request's largest allowed chunk.

``AdaptiveChunk`` ("adaptive"), the saturation-aware controller (Optimus's idea, with
deadlines). Inputs:

- the step latency ``L(shape)`` of the cost model (``StepCost.shape_s``: a measured latency
  profile, or the engine's online fit), where a step's shape counts its token-forwards, keys
  read, query-key pairs, queried rows and requests, so refresh and reuse parts are priced as
  they are (the phase mix);
- ``d(class, q)``: tokens decided per step when ``q`` positions are queried, per request class
  (threshold, block size), learned online from ``observe`` (decaying means over the engine's
  own steps; ``q`` is the chunk, or fewer at a block's end), starting from a prior (an
  acceptance profile when one is given, else ``min(q, expected_tokens_per_step)``) and kept
  non-decreasing in ``q`` (a larger query set contains the smaller one);
- each request's deadline: with ``T`` seconds left and ``R`` positions still masked, a step
  may last at most ``T * d / R`` for it to finish in time (its per-step latency budget).

Rule, each step, over the candidate chunks ``C`` (powers of two and each request's bounds):

1. for each ``c`` in ``C`` give every request ``c`` clamped to its bounds, and compute the
   batch's decided tokens per second ``sum_i d_i(c_i) / L(batch)``, where each request's
   tokens come from the cache rule (``cache_policy.compute_range``) for that query set;
2. take the ``c`` with the highest rate among those that keep every request within its
   per-step budget (a request already past its deadline, or one no chunk can save, is not a
   constraint); if none does, the one with the fewest requests over budget. Among the chunks
   whose rate is within ``RATE_MARGIN`` of that best rate (and no more requests late), take
   the largest: a smaller chunk must win by more than the cost model's error to be worth
   its extra steps (the load benchmark's latency fits err by ~5% at the median);
3. repair: a request still over budget gets its next larger chunk (more decided per step,
   fewer steps) while that brings it within budget without pushing another request out, the
   most urgent first.

At low load ``L`` is nearly flat in tokens (fixed cost, weight reads), so big chunks win; near
saturation ``L`` grows with every token and ``d(c) / c`` falls with ``c``, so small chunks win.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from dilaserve.engine.cache_policy import compute_range, needs_refresh
from dilaserve.engine.cost_model import StepCost, StepShape, expected_tokens_per_step
from dilaserve.engine.request import Request

CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)
# A smaller chunk is chosen only when its predicted rate beats a larger one's by more than this.
RATE_MARGIN = 0.05


class ChunkController(Protocol):
    def choose(self, requests: list[Request]) -> dict[str, int]: ...

    def observe(self, request: Request, chunk: int, num_decided: int) -> None: ...


class FixedChunk:
    """Each request's largest allowed chunk (the whole block unless it asked for less)."""

    def choose(self, requests: list[Request]) -> dict[str, int]:
        return {r.request_id: r.params.chunk_bounds[1] for r in requests}

    def observe(self, request: Request, chunk: int, num_decided: int) -> None:
        pass


class DecidedEstimator:
    """Tokens decided per step for each (request class, positions queried): decaying means of
    what steps decided, blended with a prior worth ``prior_weight`` steps."""

    def __init__(self, prior: Callable[[float | None, int, int], float] | None = None, prior_weight: float = 8.0,
                 decay: float = 0.995):
        self.prior = prior or (lambda t, block, q: min(float(q), expected_tokens_per_step(t, block, None)))
        self.prior_weight = prior_weight
        self.decay = decay
        self._stats: dict[tuple, list[float]] = {}

    @staticmethod
    def request_class(request: Request) -> tuple:
        t = request.threshold
        return (None if t is None else round(t, 3), request.params.block_size)

    def observe(self, request: Request, queried: int, num_decided: int) -> None:
        entry = self._stats.setdefault((self.request_class(request), queried), [0.0, 0.0])
        entry[0] = entry[0] * self.decay + num_decided
        entry[1] = entry[1] * self.decay + 1.0

    def estimate(self, request: Request, queried: int) -> float:
        cls = self.request_class(request)
        prior = self.prior(cls[0], cls[1], queried)
        total, count = self._stats.get((cls, queried), (0.0, 0.0))
        value = (prior * self.prior_weight + total) / (self.prior_weight + count)
        return min(float(queried), max(1.0, value))

    def curve(self, request: Request, sizes: list[int]) -> list[float]:
        """Estimates for increasing ``sizes``, made non-decreasing."""
        out, best = [], 1.0
        for q in sizes:
            best = max(best, self.estimate(request, q))
            out.append(best)
        return out


class _Option:
    """One chunk for one request: its step shape contribution and expected decided tokens.
    ``top`` is the largest candidate chunk with the same query set (near a block's end every
    chunk from the masked count up queries the same positions): the chunk reported."""

    __slots__ = ("chunk", "shape", "decided", "top")

    def __init__(self, chunk: int, shape: StepShape, decided: float):
        self.chunk, self.shape, self.decided, self.top = chunk, shape, decided, chunk


class AdaptiveChunk:
    """The saturation-aware controller (see the module docstring for the rule)."""

    def __init__(self, cost: Callable[[], StepCost], clock: Callable[[], float], shift_logits: bool = False,
                 estimator: DecidedEstimator | None = None, candidates: tuple[int, ...] = CANDIDATES):
        self.cost = cost
        self.clock = clock
        self.shift_logits = shift_logits
        self.estimator = estimator or DecidedEstimator()
        self.candidates = candidates
        self.last_choice: dict[str, int] = {}  # for reports and plots

    # -- learning -------------------------------------------------------------------------------
    def observe(self, request: Request, chunk: int, num_decided: int) -> None:
        # Called after the step's commit: the block then had these many masked positions.
        masked_before = len(request.masked_in_block()) + num_decided
        self.estimator.observe(request, min(chunk, masked_before), num_decided)

    # -- choosing -------------------------------------------------------------------------------
    @staticmethod
    def _state(request: Request, masked: list[int], is_refresh: bool) -> tuple:
        """Everything ``_options`` reads from a request: requests in one state share options
        (in a closed loop at high load most of the batch is in a handful of states)."""
        return (DecidedEstimator.request_class(request), request.params.chunk_bounds, request.params.cache,
                tuple(masked), is_refresh, request.seq_len, request.block_start, request.block_end,
                request.dirty_until, request.cached_until)

    def _options(self, request: Request, masked: list[int], is_refresh: bool) -> list[_Option]:
        """The request's candidate chunks (``masked``: its block's masked positions)."""
        lo, hi = request.params.chunk_bounds
        chunks = sorted({c for c in self.candidates if lo <= c <= hi} | {lo, hi})
        options, seen = [], set()
        sizes = [max(1, min(c, len(masked))) for c in chunks]
        decided = self.estimator.curve(request, sizes)
        for c, q, d in zip(chunks, sizes, decided):
            if q in seen:  # a larger chunk than the block has masked positions changes nothing
                options[-1].top = c
                continue
            seen.add(q)
            queries = masked[:q]
            start, end = compute_range(request, queries, is_refresh, self.shift_logits) if queries else (0, 0)
            tokens = end - start
            context = end if request.params.cache == "exact" else request.seq_len
            shape = StepShape(tokens, context, tokens * context, len(queries), 1, tokens if is_refresh else 0)
            options.append(_Option(c, shape, d))
        return options

    def choose(self, requests: list[Request]) -> dict[str, int]:
        if not requests:
            return {}
        cost, now = self.cost(), self.clock()
        # Options once per distinct request state (this runs on the host before every step,
        # while the GPU waits: at 256 requests one set of options per request cost ~15 ms).
        groups: dict[tuple, int] = {}
        group_options: list[list[_Option]] = []
        group_of = np.empty(len(requests), dtype=np.int64)
        for i, r in enumerate(requests):
            masked = r.masked_in_block()
            is_refresh = needs_refresh(r)
            key = self._state(r, masked, is_refresh)
            g = groups.get(key)
            if g is None:
                g = groups[key] = len(group_options)
                group_options.append(self._options(r, masked, is_refresh))
            group_of[i] = g
        options = [group_options[g] for g in group_of]
        # Padded per-group tables: features [group, option, term] and decided [group, option].
        width = max(len(opts) for opts in group_options)
        feats = np.zeros((len(group_options), width, 5))
        decided_of = np.zeros((len(group_options), width))
        for g, opts in enumerate(group_options):
            feats[g, :len(opts)] = [o.shape.features()[1:6] for o in opts]
            decided_of[g, :len(opts)] = [o.decided for o in opts]
        coef = np.array(cost.coefficients()[1:6])  # per token, context, pair, query, request
        # Seconds left and positions to decide, for requests whose deadline constrains the step;
        # a request past its deadline, or one no chunk keeps within budget even alone, does not.
        left = np.full(len(requests), np.inf)
        remaining = np.ones(len(requests))
        alone_s: dict[int, list[tuple[float, float]]] = {}  # per group: (step seconds alone, decided)
        for i, r in enumerate(requests):
            if r.deadline_s is None or r.deadline_s <= now:
                continue
            g = int(group_of[i])
            if g not in alone_s:
                alone_s[g] = [(cost.shape_s(o.shape), o.decided) for o in group_options[g]]
            t, n = r.deadline_s - now, max(1, r.num_masked_remaining())
            if any(s * n <= t * d for s, d in alone_s[g]):
                left[i], remaining[i] = t, n

        def evaluate(choice: np.ndarray) -> tuple[float, np.ndarray]:
            totals = feats[group_of, choice].sum(axis=0)
            decided = decided_of[group_of, choice]
            step_s = max(cost.fixed_s + float(coef @ totals), 1e-9)
            return float(decided.sum()) / step_s, step_s * remaining > left * decided

        trials = []
        for c in sorted({o.chunk for opts in group_options for o in opts}):
            per_group = np.array([max(k for k, o in enumerate(opts) if o.chunk <= c or k == 0)
                                  for opts in group_options])
            choice = per_group[group_of]
            rate, late = evaluate(choice)
            trials.append((-int(late.sum()), rate, choice))
        best_late, best_rate, _ = max(trials, key=lambda t: (t[0], t[1]))
        # The largest chunk (trials go up in c) whose rate is within the margin of the best.
        best_choice = [t for t in trials if t[0] == best_late and t[1] >= (1 - RATE_MARGIN) * best_rate][-1][2]
        choice = self._repair(best_choice, options, left / remaining, evaluate)
        result = {r.request_id: opts[k].top for r, opts, k in zip(requests, options, choice)}
        self.last_choice = result
        return result

    @staticmethod
    def _repair(choice: np.ndarray, options: list[list[_Option]], urgency: np.ndarray, evaluate) -> np.ndarray:
        """Raises the chunks of requests over budget, most urgent first, while that helps them
        without pushing others over."""
        _, late = evaluate(choice)
        for i in sorted(np.flatnonzero(late), key=lambda j: urgency[j]):
            while late[i] and choice[i] + 1 < len(options[i]):
                trial = choice.copy()
                trial[i] += 1
                _, trial_late = evaluate(trial)
                if np.any(trial_late & ~late):
                    break
                choice, late = trial, trial_late
        return choice


def make_chunk_controller(name: str, *, cost: Callable[[], StepCost] | None = None,
                          clock: Callable[[], float] | None = None, shift_logits: bool = False,
                          acceptance_profile: str | None = None) -> ChunkController:
    """The strategy called ``name``; "adaptive" prices steps with ``cost()`` (the engine's cost
    model), reads deadlines against ``clock()`` and starts its tokens-decided estimates from
    ``acceptance_profile`` (a file) when one is given."""
    if name == "fixed":
        return FixedChunk()
    if name == "adaptive":
        import time

        estimator = None
        if acceptance_profile:
            from dilaserve.engine.acceptance_profile import AcceptanceProfile

            profile = AcceptanceProfile.load(acceptance_profile)
            estimator = DecidedEstimator(lambda t, block, q: profile.mean(t, q))
        return AdaptiveChunk(cost or StepCost, clock or time.monotonic, shift_logits, estimator)
    raise ValueError(f"unknown chunk control {name!r}; known: fixed, adaptive")
