"""Load control: trade quality for speed request by request when a replica falls behind.

Before each step, every running threshold-decoded request whose predicted finish passes its
deadline has its threshold lowered by ``step`` (repeatedly, within one check) until it is
predicted on time or reaches its quality floor (``SamplingParams.threshold_floor``); it is
never lowered below the floor, and requests without a floor or deadline are never touched.
The prediction counts the request's remaining steps at the candidate threshold times the
replica's current step time, so it sees the batch's contention.
"""

from __future__ import annotations

from typing import Callable

from dilaserve.engine.request import Request

EPS = 1e-9


class LoadControl:
    def __init__(self, step: float, clock: Callable[[], float],
                 remaining_steps: Callable[[Request, float], float]):
        if step <= 0:
            raise ValueError("the threshold step must be > 0")
        self.step = step
        self.clock = clock
        self.remaining_steps = remaining_steps
        self.num_lowerings = 0

    def apply(self, requests: list[Request], step_s: float) -> int:
        """Lowers late requests' thresholds; returns how many lowerings it made."""
        now = self.clock()
        made = 0
        for r in requests:
            floor = r.params.threshold_floor
            if r.deadline_s is None or floor is None or r.params.decodes_whole_blocks or r.threshold is None:
                continue
            while (now + self.remaining_steps(r, r.threshold) * step_s > r.deadline_s
                   and r.threshold - floor > EPS):
                r.threshold = round(max(floor, r.threshold - self.step), 6)
                r.counters.num_threshold_lowerings += 1
                made += 1
        self.num_lowerings += made
        return made
