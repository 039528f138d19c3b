"""The scheduler: which requests run this step, in which phase, and how many tokens each.

Each step it walks the running requests by urgency (least deadline slack first; requests
without a deadline after them, oldest first), gives each its next step (refresh or reuse, see
``cache_policy``) while the step's token budget and refresh-token bound allow, then admits
waiting requests in the same order while KV pages and budgets allow. A request that does not
fit simply waits for the next step; nothing is dropped.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Callable

from dilaserve.engine.cache_policy import compute_range, needs_refresh
from dilaserve.engine.chunk_control import ChunkController
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.kv_pages import PageAllocator
from dilaserve.engine.plan import ScheduledRequest, StepOutput, StepPlan
from dilaserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self, config: EngineConfig, allocator: PageAllocator, chunk_control: ChunkController,
        shift_logits: bool, clock: Callable[[], float], remaining_s: Callable[[Request], float] | None = None,
    ):
        self.config = config
        self.allocator = allocator
        self.chunk_control = chunk_control
        self.shift_logits = shift_logits
        self.clock = clock
        self.remaining_s = remaining_s or (lambda r: 0.0)
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
        if item.is_refresh and plan.num_refresh_tokens > 0:
            return plan.num_refresh_tokens + item.num_tokens <= self.config.max_refresh_tokens
        return True

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self.running.sort(key=self._urgency)
        chunks = self.chunk_control.choose(self.running)
        for request in self.running:
            item = self._item(request, chunks[request.request_id])
            if self._fits(plan, item):
                plan.add(item)
        ordered = sorted(self.waiting, key=self._urgency)
        for request in ordered:
            if len(self.running) >= self.config.max_running or not self.allocator.can_allocate(request.seq_len):
                break
            item = self._item(request, self.chunk_control.choose([request])[request.request_id])
            if not self._fits(plan, item):
                break
            request.pages = self.allocator.allocate(request.seq_len)
            request.set_status(RequestStatus.RUNNING)
            self.waiting.remove(request)
            self.running.append(request)
            plan.add(item)
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
            if item.is_refresh:
                counters.num_refresh_steps += 1
                request.has_cache = request.params.cache != "none"
                request.dirty_until = -1
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
