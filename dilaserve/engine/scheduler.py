"""The scheduler: which requests run this step, in which phase, and how many tokens each.

Each step it walks the running requests by urgency (least deadline slack first; requests
without a deadline after them, oldest first), gives each its next step (refresh or reuse, see
``cache_policy``) while the step's token budget and refresh-token bound allow, then admits
waiting requests in the same order while KV pages and budgets allow. A request that does not
fit simply waits for the next step; nothing is dropped.

Two bounds are optional (off by default):
- ``refresh_bound="auto"`` (phase-mixed batching): the refresh part of a step may add at most
  the larger of (a) ``refresh_slowdown`` times the predicted time of the step's reuse part and
  (b) ``REFRESH_CATCH_UP`` times the refresh time the batch needs per step on average (each
  running or joinable request's refresh, priced by the cost model, over the steps it runs
  between refreshes: a block's expected steps at its tokens decided per step). Times come from
  the cost model (a latency profile). (a) keeps reuse-phase requests' step times from spiking
  when refreshes bunch up (block starts of requests admitted together); (b) keeps the bound
  above the sustained refresh rate, so the bound spreads refreshes over steps without capping
  the running set (with (a) alone a small batch admitted one refresh a step and never grew).
  Still at most ``max_refresh_tokens``, and the first refresh of a step always runs;
- ``step_memory_gib``: the step's predicted transient memory (activations, attention,
  logits; ``memory.py``) stays under the budget, which caps the batch by real memory.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Callable

from dilaserve.engine.cache_policy import compute_range, needs_refresh
from dilaserve.engine.chunk_control import ChunkController
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import StepCost, StepShape, expected_tokens_per_step
from dilaserve.engine.kv_pages import PageAllocator
from dilaserve.engine.memory import MemoryTally, StepMemoryModel
from dilaserve.engine.plan import ScheduledRequest, StepOutput, StepPlan
from dilaserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# "auto" refresh bound: the step's refresh budget is at least this times the batch's mean
# refresh demand per step, so a backlog of due refreshes drains within a few steps.
REFRESH_CATCH_UP = 1.25


class Scheduler:
    def __init__(
        self, config: EngineConfig, allocator: PageAllocator, chunk_control: ChunkController,
        shift_logits: bool, clock: Callable[[], float], remaining_s: Callable[[Request], float] | None = None,
        step_cost: Callable[[], StepCost] | None = None, memory: StepMemoryModel | None = None,
        tokens_per_step: Callable[[Request], float] | None = None,
    ):
        self.config = config
        self.allocator = allocator
        self.chunk_control = chunk_control
        self.shift_logits = shift_logits
        self.clock = clock
        self.remaining_s = remaining_s or (lambda r: 0.0)
        self.step_cost = step_cost or StepCost
        self.tokens_per_step = tokens_per_step or _prior_tokens_per_step
        self.memory = memory if config.step_memory_gib is not None else None
        if config.refresh_bound not in ("fixed", "auto"):
            raise ValueError(f"refresh_bound must be 'fixed' or 'auto', got {config.refresh_bound!r}")
        self._refresh_budget_s = None  # "auto": seconds of refresh work this step may add
        self._refresh_shape = StepShape(0, 0)
        self._memory_tally: MemoryTally | None = None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- queue management -------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._finish(request, "abort")
                    return request
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _urgency(self, request: Request) -> tuple[float, float]:
        if request.deadline_s is None:
            return (math.inf, request.arrival_s)
        return (request.deadline_s - self.clock() - self.remaining_s(request), request.arrival_s)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = request.finish_reason or reason
        request.set_status(RequestStatus.FINISHED)
        if request.pages:
            self.allocator.free(request.pages)
            request.pages = []

    # -- planning -----------------------------------------------------------------------
    def _item(self, request: Request, chunk: int) -> ScheduledRequest:
        queries = request.masked_in_block()[:chunk]
        is_refresh = needs_refresh(request)
        start, end = compute_range(request, queries, is_refresh, self.shift_logits)
        return ScheduledRequest(request, is_refresh, start, end, tuple(queries), chunk)

    def _fits(self, plan: StepPlan, item: ScheduledRequest) -> bool:
        tokens = plan.num_tokens + item.num_tokens
        if plan and tokens > self.config.max_batch_tokens:
            return False
        if self._memory_tally is not None and not self._memory_tally.fits(item):
            return False
        if plan.num_transient_tokens + item.num_transient_tokens > self.config.sparse_scratch_tokens:
            return False  # sparse-KV refreshes share the runner's scratch slots
        if item.is_refresh and plan.num_refresh_tokens > 0:
            if plan.num_refresh_tokens + item.num_tokens > self.config.max_refresh_tokens:
                return False
            if self._refresh_budget_s is not None:
                cost = self.step_cost()
                return cost.shape_s(self._refresh_shape + _shape(item)) - cost.fixed_s <= self._refresh_budget_s
        return True

    def _add(self, plan: StepPlan, item: ScheduledRequest) -> None:
        plan.add(item)
        if self._memory_tally is not None:
            self._memory_tally.add(item)
        if item.is_refresh and self._refresh_budget_s is not None:
            self._refresh_shape = self._refresh_shape + _shape(item)

    def _begin_plan(self, running_items: list[ScheduledRequest], joining: list[Request]) -> None:
        """Sets this step's bounds: memory, and the "auto" refresh budget (see the module)."""
        self._memory_tally = MemoryTally(self.memory, self.config.step_memory_gib * 2**30) if self.memory else None
        self._refresh_shape = StepShape(0, 0)
        self._refresh_budget_s = None
        if self.config.refresh_bound == "auto":
            cost = self.step_cost()
            reuse = StepShape(0, 0)
            for item in running_items:
                if not item.is_refresh:
                    reuse = reuse + _shape(item)
            demand_s = sum(self._refresh_demand_s(cost, r) for r in self.running + joining)
            self._refresh_budget_s = max(self.config.refresh_slowdown * cost.shape_s(reuse),
                                         REFRESH_CATCH_UP * demand_s)

    def _refresh_demand_s(self, cost: StepCost, request: Request) -> float:
        """Seconds of refresh work ``request`` adds per step on average: its refresh's cost over
        the steps between its refreshes."""
        params = request.params
        if params.cache == "exact":
            return 0.0
        n = request.seq_len
        refresh_s = cost.shape_s(StepShape(n, n, n * n, 1, 1, n)) - cost.fixed_s
        if params.cache == "none":
            return refresh_s
        block_steps = max(1.0, params.block_size / max(self.tokens_per_step(request), 1e-9))
        if params.refresh_interval:
            block_steps /= math.ceil(block_steps / params.refresh_interval)
        return refresh_s / block_steps

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self.running.sort(key=self._urgency)
        ordered = sorted(self.waiting, key=self._urgency)
        # One choice over the batch this step may run: the running requests and the waiting
        # ones that could join (a load-aware controller sees the whole batch).
        joining = ordered[:max(0, self.config.max_running - len(self.running))]
        chunks = self.chunk_control.choose(self.running + joining)
        items = [self._item(request, chunks[request.request_id]) for request in self.running]
        self._begin_plan(items, joining)
        for item in items:
            if self._fits(plan, item):
                self._add(plan, item)
        for request in ordered:
            if len(self.running) >= self.config.max_running or not self.allocator.can_allocate(request.kv_tokens):
                break
            item = self._item(request, chunks[request.request_id])
            if not self._fits(plan, item):
                break
            request.pages = self.allocator.allocate(request.kv_tokens)
            request.set_status(RequestStatus.RUNNING)
            self.waiting.remove(request)
            self.running.append(request)
            self._add(plan, item)
        return plan

    # -- applying a step's results --------------------------------------------------------
    def update(self, plan: StepPlan, output: StepOutput) -> list[tuple[Request, list[int]]]:
        """Commits the runner's decisions; returns (request, newly streamable tokens) for
        every request the step touched. Finished requests leave the running set."""
        now = self.clock()
        updates = []
        for item in plan.items:
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            decision = output.decisions[request.request_id]
            counters = request.counters
            counters.num_steps += 1
            counters.num_tokens_computed += item.num_tokens
            counters.num_queries += len(item.query_positions)
            if item.is_refresh:
                counters.num_refresh_steps += 1
                request.has_cache = request.params.cache != "none"
                request.dirty_until = -1
                if request.params.is_sparse_kv:  # the runner kept this many per head
                    request.sparse_count = request.sparse_keep()
            # Exact cache: this step computed everything before the block with committed tokens.
            request.cached_until = request.block_start
            request.commit(list(decision.positions), list(decision.tokens))
            self.chunk_control.observe(request, item.chunk, len(decision.positions))
            request.advance_block_if_done()
            new_tokens = request.take_new_tokens()
            if new_tokens and request.first_token_s is None:
                request.first_token_s = now
            if request.finish_reason is not None:
                self.running.remove(request)
                self._finish(request, request.finish_reason)
            updates.append((request, new_tokens))
        return updates


def _prior_tokens_per_step(request: Request) -> float:
    params = request.params
    steps = params.steps // params.num_blocks if params.steps is not None else None
    return expected_tokens_per_step(request.threshold, params.block_size, steps)


def _shape(item: ScheduledRequest) -> StepShape:
    tokens, context = item.num_tokens, item.num_context_tokens
    return StepShape(tokens, context, tokens * context, len(item.query_positions), 1,
                     tokens if item.is_refresh else 0)
