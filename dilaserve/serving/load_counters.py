"""What the ingress has seen of the offered load, for the controller. Pure logic (no Ray, no torch).

Counters only grow, so a reader takes differences between two reads for rates and shares
over any window it likes and holds no state here; ``epoch`` changes when the ingress
restarts (counters start again from zero). Lengths are the most recent finished requests'
(prompt tokens, completion tokens).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_LENGTH_SAMPLES = 256


@dataclass
class LoadCounters:
    num_arrivals: int = 0  # requests that reached admission (admitted or refused)
    num_refused: int = 0  # refused with 429
    num_finished: int = 0  # answered in full
    num_slo_met: int = 0  # of those, within their deadline
    lengths: deque = field(default_factory=lambda: deque(maxlen=MAX_LENGTH_SAMPLES))
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex)

    def arrive(self) -> None:
        self.num_arrivals += 1

    def refuse(self) -> None:
        self.num_refused += 1

    def finish(self, num_prompt_tokens: int, num_completion_tokens: int, is_slo_met: bool) -> None:
        self.num_finished += 1
        self.num_slo_met += int(bool(is_slo_met))
        self.lengths.append((num_prompt_tokens, num_completion_tokens))

    def report(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "unix_s": time.time(), "num_arrivals": self.num_arrivals,
                "num_refused": self.num_refused, "num_finished": self.num_finished,
                "num_slo_met": self.num_slo_met, "lengths": [list(pair) for pair in self.lengths]}
