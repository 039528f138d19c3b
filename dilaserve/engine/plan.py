"""What crosses the scheduler / model-runner boundary: a typed step plan and step output."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class StepPlan:
    items: list[ScheduledRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)

    @property
    def num_refresh_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items if i.is_refresh)

    @property
    def num_context_tokens(self) -> int:
        """Keys and values read: every computed token attends to its whole sequence."""
        return sum(i.request.seq_len for i in self.items)

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
