"""What happened to each replayed request, and JSON Lines files of them.

Every time is in seconds on the replay clock (0 = the trace's time 0), so a record from the
real client and one from the simulator read the same. Latencies count from the request's
*arrival* in the trace, not from when it was sent: time a request waited for a send slot is
the system's fault as far as the user is concerned.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Iterable


class Status(str, Enum):
    OK = "ok"  # the answer streamed to the end
    REFUSED = "refused"  # admission control said no (HTTP 429)
    ERROR = "error"  # any other HTTP error, broken stream or connection failure
    TIMEOUT = "timeout"  # the client gave up after its per-request timeout


@dataclass(slots=True)
class RequestRecord:
    """One request's fate. Written once by whoever replayed it (client or simulator) and read
    after; not frozen only because frozen construction is ~3x slower and the simulator makes
    millions."""

    request_id: int
    arrival_s: float  # when the trace says it arrives
    send_s: float | None  # when the client sent it (None: never sent)
    first_token_s: float | None  # first non-empty text delta
    finish_s: float | None  # end of the stream, or when the error or refusal came back
    prompt_tokens: int  # from the trace (what the prompt was built to)
    output_tokens_requested: int  # max_tokens sent
    output_tokens_received: int  # from the server's usage when given, else non-empty deltas
    status: Status
    system: str = ""
    http_status: int | None = None
    deadline_s: float | None = None  # end-to-end budget from arrival (None: no deadline)
    retry_after_s: float | None = None  # from a 429's Retry-After
    correct: bool | None = None  # answer checked against the task (None: not scored)
    threshold_used: float | None = None  # confidence threshold the server reported, if any
    chunk_size: float | None = None  # mean chunk size the server reported, if any
    error: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):  # from JSON: the string value
            self.status = Status(self.status)

    # -- derived latencies (seconds) -------------------------------------------------
    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        """Arrival to the end of a completed answer."""
        return self.finish_s - self.arrival_s if self.status is Status.OK and self.finish_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: ``(finish - first) / (received - 1)``."""
        if self.status is not Status.OK or self.first_token_s is None or self.finish_s is None:
            return None
        if self.output_tokens_received < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens_received - 1)

    @property
    def slo_met(self) -> bool:
        """Completed, and within the deadline when there is one. Refusals and errors miss."""
        if self.status is not Status.OK:
            return False
        return self.deadline_s is None or (self.e2e_s is not None and self.e2e_s <= self.deadline_s)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["status"] = self.status.value
        data.update(ttft_s=self.ttft_s, tpot_s=self.tpot_s, e2e_s=self.e2e_s, slo_met=self.slo_met)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def save_records(records: Iterable[RequestRecord], path: str | Path) -> Path:
    """One JSON object per record and line (derived latencies and ``slo_met`` included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_dict()) + "\n")
    return path


def load_records(path: str | Path) -> list[RequestRecord]:
    with open(path) as handle:
        return [RequestRecord.from_dict(json.loads(line)) for line in handle if line.strip()]
