"""One object holds everything about a request; only the engine's update step changes it."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from dilaserve.engine.sampling_params import RequestCounters, SamplingParams
from dilaserve.generation.names import scheduled_count


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, no pages
    RUNNING = "running"  # has pages, decoding
    FINISHED = "finished"  # done (eos, length, stop, abort, error); pages returned

    # Allowed transitions; anything else is a bug.
    def can_become(self, other: "RequestStatus") -> bool:
        return other in _TRANSITIONS[self]


_TRANSITIONS = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.FINISHED},
    RequestStatus.RUNNING: {RequestStatus.WAITING, RequestStatus.FINISHED},  # WAITING = preempted
    RequestStatus.FINISHED: set(),
}


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    mask_id: int
    stop_ids: frozenset[int]
    arrival_s: float
    deadline_s: float | None = None
    status: RequestStatus = RequestStatus.WAITING
    # The canvas: prompt then max_tokens positions, mask_id where not yet committed.
    canvas: list[int] = field(default_factory=list)
    block_idx: int = 0
    step_in_block: int = 0
    num_masked_at_block_start: int = 0
    # Highest position committed since the last refresh (its cached k, v are stale): a dual
    # cache reuse step recomputes the block up to here.
    dirty_until: int = -1
    has_cache: bool = False  # the KV pages hold this request's refreshed keys and values
    # Where block 0 starts: the prompt's end (bidirectional models, the default) or, for
    # block-causal models, the prompt's last block boundary (blocks align to position 0).
    block_origin: int | None = None
    # Exact cache (block-causal models): positions below hold their final keys and values.
    cached_until: int = 0
    threshold: float | None = None  # current threshold (load control may lower it)
    num_emitted: int = 0  # generated tokens already streamed
    pages: list[int] = field(default_factory=list)
    counters: RequestCounters = field(default_factory=RequestCounters)
    finish_reason: str | None = None
    first_token_s: float | None = None
    # Finish predictions, to measure their error (EngineCore.prediction_scale): (time, seconds
    # to finish predicted then, delay charged before then, requests held then); and the delay
    # charged for newcomers that joined the batch since it was taken.
    predictions: list[tuple[float, float, float, int]] = field(default_factory=list)
    charged_s: float = 0.0
    # Sparse KV: out-of-block positions each KV head kept at the last refresh (the first slots
    # of the request's sparse region, after its sequence in the page table).
    sparse_count: int = 0
    # Positions before the block that a reuse step computes (1 where logits are shifted: Dream
    # reads position p from p - 1): with sparse KV they are read fresh, never kept.
    window_lead: int = 0
    # Sparse KV with a scratch region: positions below this have no pages of their own; their
    # keys and values exist only in refresh steps (in the runner's scratch slots), and reuse
    # steps see them only through the sparse region. 0: every position has its slot.
    kv_offset: int = 0

    def __post_init__(self) -> None:
        if not self.canvas:
            self.canvas = list(self.prompt_ids) + [self.mask_id] * self.params.max_tokens
        if self.threshold is None:
            self.threshold = self.params.threshold
        if self.block_origin is None:
            self.block_origin = self.prompt_len
        self.num_masked_at_block_start = len(self.masked_in_block())

    @property
    def sparse_capacity(self) -> int:
        """KV slots of the sparse region (0 when dense): room for the most a refresh keeps."""
        r = self.params.kv_retention
        return 0 if r is None else math.ceil(r * self.seq_len)

    @property
    def kv_tokens(self) -> int:
        """KV slots the request's pages hold: its sequence from ``kv_offset``, then its sparse
        region."""
        return self.seq_len - self.kv_offset + self.sparse_capacity

    @property
    def sparse_window(self) -> tuple[int, int]:
        """Positions a sparse reuse step reads from the sequence itself: the block, and the
        ``window_lead`` positions before it. A refresh keeps a share of the others."""
        return max(0, self.block_start - self.window_lead), self.block_end

    def sparse_keep(self) -> int:
        """Positions per KV head a refresh now keeps: the retention share of those outside the
        window (at least one when there are any)."""
        start, end = self.sparse_window
        outside = self.seq_len - (end - start)
        return min(self.sparse_capacity, math.ceil(self.params.kv_retention * outside)) if outside > 0 else 0

    def set_status(self, status: RequestStatus) -> None:
        if not self.status.can_become(status):
            raise RuntimeError(f"request {self.request_id}: {self.status.value} -> {status.value} is not allowed")
        self.status = status

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def seq_len(self) -> int:
        return len(self.canvas)

    @property
    def block_start(self) -> int:
        return self.block_origin + self.block_idx * self.params.block_size

    @property
    def block_end(self) -> int:
        return min(self.block_start + self.params.block_size, self.seq_len)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def masked_in_block(self) -> list[int]:
        return [p for p in range(self.block_start, self.block_end) if self.canvas[p] == self.mask_id]

    def num_masked_remaining(self) -> int:
        return self.canvas[self.block_start:].count(self.mask_id)

    def scheduled_commits(self, num_queries: int) -> int:
        """For a fixed-steps request (``params.steps``): how many of ``num_queries`` queried
        positions LLaDA's schedule commits at this step of the block (``FixedStepsUnmasker``).
        Runners that stand in for a model's decisions (simulator, load benchmark) use it."""
        steps_per_block = self.params.steps // self.params.num_blocks
        return scheduled_count(self.num_masked_at_block_start, steps_per_block, self.step_in_block, num_queries)

    def commit(self, positions: list[int], tokens: list[int]) -> None:
        for p, t in zip(positions, tokens):
            self.canvas[p] = t
        if positions:
            self.dirty_until = max(self.dirty_until, max(positions))
        self.counters.num_tokens_decided += len(positions)

    def advance_block_if_done(self) -> None:
        """Moves to the next block once the current one has no masked position."""
        self.step_in_block += 1
        while self.block_end < self.seq_len and self.mask_id not in self.canvas[self.block_start:self.block_end]:
            self.block_idx += 1
            self.step_in_block = 0
            self.num_masked_at_block_start = len(self.masked_in_block())
            self.dirty_until = -1

    def take_new_tokens(self) -> list[int]:
        """Tokens now streamable: committed, with every earlier position committed, up to a
        stop token. Sets ``finish_reason`` when the request is complete."""
        start = self.prompt_len + self.num_emitted
        new: list[int] = []
        for pos in range(start, self.seq_len):
            token = self.canvas[pos]
            if token == self.mask_id:
                break
            if token in self.stop_ids:
                self.finish_reason = "eos"
                break
            new.append(token)
        self.num_emitted += len(new)
        if self.finish_reason is None and self.prompt_len + self.num_emitted == self.seq_len:
            self.finish_reason = "length"
        return new
