"""What crosses the scheduler / model-runner boundary: a typed step plan and step output."""

from __future__ import annotations

from dataclasses import dataclass

from dilaserve.engine.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step.

    The step computes positions ``[compute_start, compute_end)`` of the request's sequence
    (writing their keys and values to its pages) and decides ``query_positions``, the first
    ``chunk`` still-masked positions of its current block.
    """

    request: Request
    is_refresh: bool
    compute_start: int
    compute_end: int
    query_positions: tuple[int, ...]
    chunk: int

    @property
    def num_tokens(self) -> int:
        return self.compute_end - self.compute_start

    @property
    def uses_sparse_kv(self) -> bool:
        """A reuse step of a sparse-KV request: its keys are the kept positions and the block."""
        r = self.request
        return r.params.is_sparse_kv and not self.is_refresh and r.has_cache

    @property
    def num_transient_tokens(self) -> int:
        """Tokens whose keys and values live in the runner's scratch slots for this step only
        (a sparse-KV refresh's positions below ``kv_offset``)."""
        return self.request.kv_offset if self.is_refresh else 0

    @property
    def num_context_tokens(self) -> int:
        """Keys and values the step reads: the whole sequence, except with the exact cache of
        block-causal models, whose queries see nothing past their block, and with sparse KV
        (the positions kept at the last refresh, then the block)."""
        r = self.request
        if self.uses_sparse_kv:
            start, end = r.sparse_window
            return r.sparse_count + end - start
        return self.compute_end if r.params.cache == "exact" else r.seq_len


class StepPlan:
    """The requests of one step, with running totals the scheduler checks budgets against."""

    def __init__(self) -> None:
        self.items: list[ScheduledRequest] = []
        self.num_tokens = 0
        self.num_refresh_tokens = 0
        self.num_context_tokens = 0  # keys and values read (ScheduledRequest.num_context_tokens)
        self.num_transient_tokens = 0  # scratch slots the step needs (ScheduledRequest.num_transient_tokens)

    def add(self, item: ScheduledRequest) -> None:
        self.items.append(item)
        self.num_tokens += item.num_tokens
        self.num_context_tokens += item.num_context_tokens
        self.num_transient_tokens += item.num_transient_tokens
        if item.is_refresh:
            self.num_refresh_tokens += item.num_tokens

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass(frozen=True)
class Decision:
    """The runner's verdict for one scheduled request: which query positions commit to what."""

    positions: tuple[int, ...]
    tokens: tuple[int, ...]


@dataclass
class StepOutput:
    decisions: dict[str, Decision]  # by request id
    elapsed_s: float = 0.0
