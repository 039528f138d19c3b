"""A trace: request arrivals with prompt and output lengths, and the transformations on it.

Times are seconds on the replay clock; the loaders put the first arrival at 0. A ``Trace`` is
immutable: every transformation returns a new one, so a loaded trace can be replayed at
several rates and caps without reloading.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal, NamedTuple, Sequence, overload

log = logging.getLogger(__name__)


class TraceRequest(NamedTuple):
    """One request of a trace: when it arrives and how long its prompt and answer are.

    A named tuple rather than a dataclass: simulator traces hold millions of them."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class LoadReport:
    """What a loader read: rows loaded, rows dropped on purpose, malformed rows skipped."""

    source: str
    num_rows: int = 0  # data rows seen (header and blank lines excluded)
    num_loaded: int = 0
    num_filtered: int = 0  # well-formed rows dropped by a filter (model, failed requests)
    num_malformed: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    first_malformed_lines: tuple[int, ...] = ()  # 1-based line numbers, at most 10

    def summary(self) -> str:
        text = f"{self.source}: {self.num_loaded} of {self.num_rows} rows loaded"
        if self.num_filtered:
            text += f", {self.num_filtered} filtered"
        if self.num_malformed:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.malformed_reasons.items()))
            text += f", {self.num_malformed} malformed skipped ({reasons}; first at lines {list(self.first_malformed_lines)})"
        return text


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival time (sorted on construction, stably)."""

    requests: tuple[TraceRequest, ...]
    name: str = ""

    def __post_init__(self) -> None:
        requests = tuple(self.requests)
        if any(b.arrival_s < a.arrival_s for a, b in zip(requests, requests[1:])):
            requests = tuple(sorted(requests, key=lambda r: r.arrival_s))
        object.__setattr__(self, "requests", requests)

    # -- sequence protocol -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @overload
    def __getitem__(self, index: int) -> TraceRequest: ...
    @overload
    def __getitem__(self, index: slice) -> Trace: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return Trace(self.requests[index], self.name)
        return self.requests[index]

    # -- facts -----------------------------------------------------------------------
    @property
    def start_s(self) -> float:
        return self.requests[0].arrival_s if self.requests else 0.0

    @property
    def span_s(self) -> float:
        """Time from the first arrival to the last (0 for fewer than two requests)."""
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def mean_rate_rps(self) -> float:
        """Requests per second over the arrival span: ``len / span``."""
        return len(self) / self.span_s if self.span_s > 0 else 0.0

    def _with(self, requests: Sequence[TraceRequest], suffix: str = "") -> Trace:
        return Trace(tuple(requests), self.name + suffix)

    # -- transformations -------------------------------------------------------------
    def rebase(self) -> Trace:
        """Shift times so the first arrival is at 0."""
        t0 = self.start_s
        return self._with([TraceRequest(r.arrival_s - t0, r.prompt_tokens, r.output_tokens) for r in self])

    def window(self, start_s: float = 0.0, duration_s: float | None = None, *, rebase: bool = True) -> Trace:
        """Requests arriving in ``[start_s, start_s + duration_s)``; times shifted so ``start_s`` is 0."""
        end_s = float("inf") if duration_s is None else start_s + duration_s
        kept = [r for r in self if start_s <= r.arrival_s < end_s]
        if rebase:
            kept = [TraceRequest(r.arrival_s - start_s, r.prompt_tokens, r.output_tokens) for r in kept]
        return self._with(kept)

    def head(self, num_requests: int) -> Trace:
        """The first ``num_requests`` arrivals."""
        return self._with(self.requests[:num_requests])

    def scale_rate(self, factor: float) -> Trace:
        """Compress every inter-arrival gap by ``factor`` (2.0: twice the request rate).

        The first arrival stays where it is: ``t' = t0 + (t - t0) / factor``.
        """
        if not factor > 0:
            raise ValueError(f"rate scale must be > 0, got {factor}")
        t0 = self.start_s
        return self._with([TraceRequest(t0 + (r.arrival_s - t0) / factor, r.prompt_tokens, r.output_tokens)
                           for r in self])

    def scale_lengths(self, prompt_factor: float = 1.0, output_factor: float = 1.0) -> Trace:
        """Multiply token counts, rounding to the nearest integer and keeping at least 1."""
        if not (prompt_factor > 0 and output_factor > 0):
            raise ValueError("length scale factors must be > 0")
        return self._with([
            TraceRequest(r.arrival_s, max(1, round(r.prompt_tokens * prompt_factor)),
                         max(1, round(r.output_tokens * output_factor)))
            for r in self
        ])

    def cap_lengths(
        self, *, max_prompt_tokens: int | None = None, max_output_tokens: int | None = None,
        max_total_tokens: int | None = None, mode: Literal["clip", "drop"] = "clip",
    ) -> Trace:
        """Fit every request to a model's limits.

        ``clip`` keeps every request: prompt and output are cut to their own limits, then, if
        their sum is still over ``max_total_tokens``, both shrink by the same factor (the
        output rounded down, at least 1; the prompt takes the rest), keeping the request's
        shape. ``drop`` removes requests over any limit instead.
        """
        if mode not in ("clip", "drop"):
            raise ValueError(f"mode must be 'clip' or 'drop', got {mode!r}")
        if max_total_tokens is not None and max_total_tokens < 2:
            raise ValueError("max_total_tokens must be at least 2 (one prompt and one output token)")
        inf = float("inf")
        max_p = max_prompt_tokens if max_prompt_tokens is not None else inf
        max_o = max_output_tokens if max_output_tokens is not None else inf
        max_t = max_total_tokens if max_total_tokens is not None else inf
        kept: list[TraceRequest] = []
        num_changed = 0
        for r in self:
            if mode == "drop":
                if r.prompt_tokens <= max_p and r.output_tokens <= max_o and r.total_tokens <= max_t:
                    kept.append(r)
                continue
            prompt = int(min(r.prompt_tokens, max_p))
            output = int(min(r.output_tokens, max_o))
            if prompt + output > max_t:
                output = max(1, math.floor(output * max_t / (prompt + output)))
                prompt = int(max_t - output)
            if (prompt, output) != (r.prompt_tokens, r.output_tokens):
                num_changed += 1
                r = TraceRequest(r.arrival_s, prompt, output)
            kept.append(r)
        if mode == "drop":
            log.info("cap_lengths dropped %d of %d requests", len(self) - len(kept), len(self))
        else:
            log.info("cap_lengths clipped %d of %d requests", num_changed, len(self))
        return self._with(kept)
