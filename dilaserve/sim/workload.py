"""A trace as flat arrays, and every request's decoding work from the cost model.

``request_work`` (the cost model's own function) is called once or twice per distinct output
length, not once per request: for a given output length and block schedule its token and
context counts are affine in the sequence length (every term of its sum is a whole-sequence
refresh, a block, or the remaining suffix), so two evaluations give the line and numpy applies
it to every request. ``tests/sim/test_workload.py`` checks this against direct calls.

``request_work`` counts ``ceil(block / tokens_per_step)`` steps per block, as the engine's
predictions do; decoding at that mean rate takes ``block / tokens_per_step`` steps per full
block on average. ``expected_work_arrays`` gives that expectation (what the fast simulator
runs), as the mix of the two whole step counts around it, each from ``request_work``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dilaserve.engine.cost_model import Work, request_work
from dilaserve.replay.trace import Trace


@dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # float64, sorted
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64, >= 1

    @classmethod
    def from_trace(cls, trace: Trace) -> Workload:
        if not len(trace):
            return cls(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        arrival, prompt, output = zip(*trace.requests)
        return cls(np.asarray(arrival, dtype=np.float64), np.maximum(1, np.asarray(prompt, dtype=np.int64)),
                   np.maximum(1, np.asarray(output, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def seq_len(self) -> np.ndarray:
        return self.prompt_tokens + self.output_tokens


def work_arrays(workload: Workload, block_size: int, tokens_per_step: float, cache: str) -> Work:
    """Each request's whole decoding work as a ``Work`` of arrays (steps, token-forwards,
    keys read), equal to ``request_work(seq_len, output_tokens, ...)`` request by request."""
    lengths, inverse = np.unique(workload.output_tokens, return_inverse=True)
    steps = np.empty(len(lengths))
    base = np.empty(len(lengths))
    slope = np.empty(len(lengths))
    for j, out in enumerate(lengths.tolist()):
        one = request_work(out + 1, out, block_size, tokens_per_step, cache)
        two = request_work(out + 2, out, block_size, tokens_per_step, cache)
        steps[j] = one.steps
        slope[j] = two.tokens - one.tokens
        base[j] = one.tokens - slope[j] * (out + 1)
    seq = workload.seq_len.astype(np.float64)
    request_steps = steps[inverse]
    return Work(request_steps, base[inverse] + slope[inverse] * seq, request_steps * seq)


def expected_work_arrays(workload: Workload, block_size: int, tokens_per_step: float, cache: str) -> Work:
    """Each request's work when full blocks take ``block_size / tokens_per_step`` steps on
    average: ``request_work`` at the two whole step counts per block around it, mixed."""
    steps_per_block = max(1.0, block_size / tokens_per_step)
    low = math.floor(steps_per_block)
    weight_high = steps_per_block - low
    # (1 + 1e-9): block / (block / n) must not round above n before request_work's ceil.
    fast = work_arrays(workload, block_size, block_size / low * (1 + 1e-9), cache)
    if weight_high < 1e-9:
        return fast
    slow = work_arrays(workload, block_size, block_size / (low + 1) * (1 + 1e-9), cache)
    return Work(*((1 - weight_high) * a + weight_high * b for a, b in
                  ((fast.steps, slow.steps), (fast.tokens, slow.tokens), (fast.context_tokens, slow.context_tokens))))
