"""What the ingress learns about one response as its chunks arrive: text, token ids, timing,
usage, and at the end whether it met its SLO."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dilaserve.serving.admission import Deadline, is_slo_met
from dilaserve.serving.messages import Chunk
from dilaserve.serving.openai_responses import Usage


@dataclass
class ResponseProgress:
    arrival_s: float  # time.monotonic() at arrival
    replica: str
    deadline: Deadline
    num_prompt_tokens: int
    threshold: float | None = None
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    last: Chunk | None = None  # the final chunk, once seen
    end_s: float | None = None
    is_settled: bool = False  # the ingress has released the replica slot and recorded the outcome

    def observe(self, chunk: Chunk) -> None:
        now = time.monotonic()
        if chunk.token_ids and self.first_token_s is None:
            self.first_token_s = now
        self.text_parts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if chunk.finished:
            self.last, self.end_s = chunk, now

    @property
    def is_finished(self) -> bool:
        return self.last is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def num_completion_tokens(self) -> int:
        return self.last.num_completion_tokens if self.last else len(self.token_ids)

    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, self.num_completion_tokens)

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        n = self.num_completion_tokens
        if self.end_s is None or self.first_token_s is None or n < 2:
            return None
        return (self.end_s - self.first_token_s) / (n - 1)

    @property
    def is_slo_met(self) -> bool | None:
        e2e = self.e2e_s
        return None if e2e is None else is_slo_met(self.deadline, e2e, self.ttft_s, self.tpot_s)

    def summary(self) -> dict[str, Any]:
        """The ``dilaserve`` object of a full response or of a stream's last chunk."""
        last = self.last or Chunk()

        def ms(s: float | None) -> float | None:
            return None if s is None else round(s * 1e3, 3)

        return {
            "replica": self.replica, "threshold": last.threshold if last.threshold is not None else self.threshold,
            "kv_retention": last.kv_retention,
            "deadline_ms": ms(self.deadline.budget_s), "deadline_source": self.deadline.source,
            "slo_met": self.is_slo_met, "ttft_ms": ms(self.ttft_s), "tpot_ms": ms(self.tpot_s),
            "e2e_ms": ms(self.e2e_s), "num_steps": last.num_steps, "num_tokens_decided": last.num_tokens_decided,
            "chunk_size": None if last.chunk_size is None else round(last.chunk_size, 2),
            "token_ids": list(self.token_ids),
        }
