"""Load control lowers late requests' thresholds, never below their floor."""

from __future__ import annotations

import time

from dilaserve.engine.load_control import LoadControl
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from tests.engine.helpers import new_engine


def make(threshold=0.9, floor=0.5, deadline=10.0, steps=None):
    params = SamplingParams(max_tokens=32, block_size=8, threshold=threshold, threshold_floor=floor, steps=steps)
    return Request("r", [1, 2], params, mask_id=0, stop_ids=frozenset(), arrival_s=0.0, deadline_s=deadline)


def steps_at(request, threshold):
    # Fake profile: 40 steps at 0.9, 10 fewer for every 0.1 lower.
    return 40 - 100 * (0.9 - threshold)


def test_lowers_until_on_time():
    control = LoadControl(0.1, clock=lambda: 0.0, remaining_steps=steps_at)
    r = make(deadline=2.5)  # step 0.1 s: 40 steps = 4.0 s late; 20 steps (t=0.7) = 2.0 s on time
    assert control.apply([r], step_s=0.1) == 2
    assert abs(r.threshold - 0.7) < 1e-9 and r.counters.num_threshold_lowerings == 2


def test_never_below_floor():
    control = LoadControl(0.1, clock=lambda: 0.0, remaining_steps=steps_at)
    r = make(deadline=0.1, floor=0.65)
    control.apply([r], step_s=0.1)
    assert abs(r.threshold - 0.65) < 1e-9
    control.apply([r], step_s=0.1)
    assert abs(r.threshold - 0.65) < 1e-9


def test_untouched_without_floor_deadline_or_when_on_time():
    control = LoadControl(0.1, clock=lambda: 0.0, remaining_steps=steps_at)
    no_floor, no_deadline, on_time = make(floor=None, deadline=0.1), make(deadline=None), make(deadline=100.0)
    fixed = make(deadline=0.1, steps=8)
    assert control.apply([no_floor, no_deadline, on_time, fixed], step_s=0.1) == 0
    assert no_floor.threshold == no_deadline.threshold == on_time.threshold == 0.9


def test_engine_lowers_late_requests_and_still_finishes(llada):
    engine = new_engine(llada, load_control=True, threshold_step=0.2)
    late = SamplingParams(max_tokens=64, block_size=8, threshold=0.95, threshold_floor=0.35, cache="dual")
    free = SamplingParams(max_tokens=64, block_size=8, threshold=0.95, cache="dual")
    past = time.monotonic() - 1.0  # already late: load control must act, down to the floor only
    engine.add(engine.make_request("late", [3, 4, 5], late, deadline_s=past))
    engine.add(engine.make_request("free", [3, 4, 5], free, deadline_s=past))
    finished = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.counters
    assert set(finished) == {"late", "free"}
    assert finished["late"].num_threshold_lowerings == 3  # 0.95 -> 0.75 -> 0.55 -> 0.35 (floor)
    assert finished["free"].num_threshold_lowerings == 0
    assert engine.stats().num_threshold_lowerings == 3
