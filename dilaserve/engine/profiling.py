"""Timing real engine steps for the latency profile.

Each grid point builds ``batch_size`` requests of ``context`` tokens (prompt, then two blocks to
decode) in the state the phase needs, plans their step with the engine's own rules
(``cache_policy``: a refresh computes the whole sequence, a dual-cache reuse step the block up
to its last query) and runs it through the ``ModelRunner``: the packed forward, the logit
budget and the unmasking decisions, as in serving. Nothing is committed, so the same plan runs
``warmup + repeats`` times; the point's time is the median of the repeats (the runner
synchronises CUDA before it stops its clock).

Phases: ``refresh`` (every request refreshes), ``reuse`` (every request reuses its cache),
``mixed`` (a quarter of the batch, at least one, refreshes; the rest reuse).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from dilaserve.engine.cache_policy import compute_range, needs_refresh
from dilaserve.engine.cost_model import StepShape
from dilaserve.engine.kv_pages import PageAllocator
from dilaserve.engine.latency_profile import PHASES, LatencyPoint
from dilaserve.engine.model_runner import ModelRunner
from dilaserve.engine.plan import ScheduledRequest, StepPlan
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.models.base import DiffusionLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    chunks: tuple[int, ...] = (4, 8, 32)
    contexts: tuple[int, ...] = (64, 128, 256)  # tokens per request (prompt + generated)
    phases: tuple[str, ...] = PHASES
    block_size: int = 32
    max_step_tokens: int = 16384  # points computing more token-forwards per step are skipped
    warmup: int = 2
    repeats: int = 5
    kv_retention: float | None = None  # sparse KV (dual cache); None: dense

    def points(self) -> list[tuple[str, int, int, int]]:
        """(phase, batch, chunk, context) of every point to measure."""
        out = []
        for phase in self.phases:
            for context in self.contexts:
                for batch in self.batch_sizes:
                    if phase == "mixed" and batch < 2:
                        continue  # a batch of one is all refresh or all reuse
                    for chunk in self.chunks:
                        if self.step_tokens(phase, batch, min(chunk, self.block_size), context) <= self.max_step_tokens:
                            out.append((phase, batch, chunk, context))
        return out

    def num_refreshing(self, phase: str, batch: int) -> int:
        return {"refresh": batch, "reuse": 0}.get(phase, max(1, batch // 4))

    def step_tokens(self, phase: str, batch: int, chunk: int, context: int) -> int:
        refreshing = self.num_refreshing(phase, batch)
        return refreshing * context + (batch - refreshing) * chunk

    def pages_needed(self, page_size: int) -> int:
        extra = 1 + (self.kv_retention or 0.0)  # a sparse region after each sequence
        return max(b for b in self.batch_sizes) * -(-int(max(self.contexts) * extra + 1) // page_size)


def kv_does_not_fit(grid: Grid, page_size: int, bytes_per_page: int, free_bytes: int) -> str | None:
    """Why the grid's KV cache (its largest batch at its longest context, allocated up front)
    cannot fit in ``free_bytes`` of device memory, or None when it fits."""
    need = grid.pages_needed(page_size) * bytes_per_page
    if need <= free_bytes:
        return None
    return (f"the grid's KV cache needs {need / 2**30:.1f} GiB (batch {max(grid.batch_sizes)} x context "
            f"{max(grid.contexts)}{'' if not grid.kv_retention else ' + its sparse region'}) but only "
            f"{free_bytes / 2**30:.1f} GiB of device memory is free after the weights; "
            f"lower --batch-sizes or --contexts")


def make_requests(spec, batch: int, context: int, block_size: int, num_refreshing: int, seed: int,
                  kv_retention: float | None = None) -> list[Request]:
    """``batch`` requests of ``context`` tokens at the start of their first block: the first
    ``num_refreshing`` about to refresh, the others holding a refreshed cache (a reuse step;
    with sparse KV, holding what a refresh keeps)."""
    generated = min(2 * block_size, context - 1)
    gen = torch.Generator().manual_seed(seed)
    high = min(spec.mask_token_id, spec.eos_token_id)
    requests = []
    for i in range(batch):
        prompt = torch.randint(0, high, (context - generated,), generator=gen).tolist()
        params = SamplingParams(max_tokens=generated, block_size=block_size, threshold=0.9, cache="dual",
                                kv_retention=kv_retention)
        r = Request(f"profile-{i}", prompt, params, spec.mask_token_id, frozenset({spec.eos_token_id}), 0.0,
                    threshold=0.9, window_lead=1 if spec.shift_logits else 0)
        if i >= num_refreshing:
            r.has_cache, r.step_in_block = True, 1
            if kv_retention is not None:
                r.sparse_count = r.sparse_keep()
        requests.append(r)
    return requests


def make_plan(requests: list[Request], chunk: int, shift_logits: bool) -> StepPlan:
    plan = StepPlan()
    for r in requests:
        queries = r.masked_in_block()[:chunk]
        is_refresh = needs_refresh(r)
        start, end = compute_range(r, queries, is_refresh, shift_logits)
        plan.add(ScheduledRequest(r, is_refresh, start, end, tuple(queries), chunk))
    return plan


def measure_grid(model: DiffusionLM, grid: Grid, page_size: int = 16, kernels: str = "auto",
                 progress: Callable[[LatencyPoint], None] | None = None, tp=None) -> list[LatencyPoint]:
    """Times every grid point with the engine's model runner; returns the points in order.
    ``tp``: the tensor-parallel group when ``model`` is rank 0's shard (its workers run each step)."""
    spec = model.spec
    num_pages = grid.pages_needed(page_size)
    if tp is not None:
        tp.setup(num_pages)
    runner = ModelRunner(model, num_pages, page_size, kernels, tp=tp)
    allocator = PageAllocator(num_pages, page_size)
    points = []
    for n, (phase, batch, chunk, context) in enumerate(grid.points()):
        requests = make_requests(spec, batch, context, grid.block_size, grid.num_refreshing(phase, batch), seed=n,
                                 kv_retention=grid.kv_retention)
        for r in requests:
            r.pages = allocator.allocate(r.kv_tokens)
        plan = make_plan(requests, chunk, spec.shift_logits)
        try:
            for _ in range(grid.warmup):
                runner.run(plan)
            samples = tuple(runner.run(plan).elapsed_s for _ in range(grid.repeats))
        finally:
            for r in requests:
                runner.release(r.request_id)
                allocator.free(r.pages)
                r.pages = []
        point = LatencyPoint(phase, batch, chunk, context, StepShape.from_plan(plan), statistics.median(samples),
                             samples)
        points.append(point)
        if progress is not None:
            progress(point)
    del runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return points
