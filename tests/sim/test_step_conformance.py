"""A step-fidelity replica is the engine: the real ``Engine`` (torch, tiny model) driven by
the same simulated runner and clock produces the same timeline, request for request."""

from __future__ import annotations

import pytest

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.sim import AcceptanceModel, ReplicaGroup
from dilaserve.sim.runner import SimulatedRunner
from dilaserve.sim.step_replica import MASK_ID, StepReplica

# (prompt tokens, max tokens, deadline s): tight deadlines make load control lower thresholds.
REQUESTS = [(12, 40, 0.05), (30, 16, 0.2), (5, 64, 0.08), (20, 24, None), (8, 33, 0.03), (40, 8, 0.5), (16, 48, 0.1)]


class ClockedRunner:
    """The simulated runner with the real engine: the step's time passes on the engine's clock."""

    def __init__(self, runner: SimulatedRunner, clock: list[float]):
        self.runner, self.clock = runner, clock

    def run(self, plan):
        output = self.runner.run(plan)
        self.clock[0] += output.elapsed_s
        return output

    def release(self, request_id: str) -> None:
        pass


def flat(pairs: list[tuple[float, float]]) -> list[float]:
    return [x for pair in pairs for x in pair]


def timeline(requests: dict[str, Request], finished_at: dict[str, float]):
    return {rid: (r.first_token_s, finished_at[rid], r.counters.num_steps, r.counters.num_tokens_computed,
                  r.counters.num_threshold_lowerings, r.threshold) for rid, r in requests.items()}


@pytest.mark.parametrize("load_control", [False, True])
def test_step_replica_reproduces_the_engine_step_for_step(llada, load_control):
    config = EngineConfig(num_pages=24, page_size=8, max_running=4, max_batch_tokens=160, max_refresh_tokens=80,
                          load_control=load_control)
    group = ReplicaGroup("g", engine=config)
    params = [SamplingParams(max_tokens=out, block_size=8, threshold=0.9, threshold_floor=0.5)
              for _, out, _ in REQUESTS]

    clock = [0.0]
    engine = Engine(llada, config, clock=lambda: clock[0])
    token_id = 5
    assert token_id not in (llada.spec.eos_token_id, llada.spec.mask_token_id)
    engine.runner = ClockedRunner(SimulatedRunner(group.cost, AcceptanceModel(), seed=11, token_id=token_id), clock)
    real = {}
    for i, ((prompt, _, deadline), p) in enumerate(zip(REQUESTS, params)):
        real[str(i)] = engine.make_request(str(i), [7] * prompt, p, deadline_s=deadline)
        engine.add(real[str(i)])
    probe = SamplingParams(max_tokens=32, block_size=8, threshold=0.9)
    real_finished, real_predictions = {}, []
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                real_finished[out.request_id] = clock[0]
        real_predictions.append((engine.predict_finish_s(10, probe), engine.predict_latency_s(10, probe)))

    replica = StepReplica("r", group, AcceptanceModel(), seed=11)
    sim = {}
    for i, ((prompt, _, deadline), p) in enumerate(zip(REQUESTS, params)):
        sim[str(i)] = Request(str(i), [0] * prompt, p, MASK_ID, frozenset(), 0.0, deadline, threshold=p.threshold)
        replica.scheduler.add(sim[str(i)])
    sim_finished, sim_predictions = {}, []
    now = 0.0
    while replica.scheduler.has_work():
        now = replica.start_step(now)
        for request in replica.finish_step(now):
            sim_finished[request.request_id] = now
        sim_predictions.append((replica.predict_finish_s(10, probe), replica.predict_latency_s(10, probe)))

    assert timeline(sim, sim_finished) == timeline(real, real_finished)
    if load_control:
        assert any(r.counters.num_threshold_lowerings for r in sim.values())
    # So do the predictions the ingress reads (they go through the online cost model's refits).
    assert flat(sim_predictions) == pytest.approx(flat(real_predictions), rel=1e-9)


def test_fixed_steps_requests_commit_on_llada_schedule_as_the_engine_does(llada):
    """The simulator's fixed-steps requests (``params.steps``) commit what the engine's
    ``FixedStepsUnmasker`` commits, step for step: counts are set by the schedule, not drawn."""
    config = EngineConfig(num_pages=64, page_size=8, max_running=3, max_batch_tokens=400)
    # (prompt tokens, params): uneven schedules (10 over 4 steps: 3, 3, 2, 2), a short last block,
    # and more requests than may run at once.
    specs = [(9, SamplingParams(max_tokens=20, block_size=10, steps=8)),
             (4, SamplingParams(max_tokens=16, block_size=8, steps=2)),
             (13, SamplingParams(max_tokens=12, block_size=8, steps=6)),
             (6, SamplingParams(max_tokens=24, block_size=8, steps=9))]

    def masked_after_each_step(step, requests):
        history = []
        while any(not r.is_finished for r in requests.values()):
            step()
            history.append({rid: r.num_masked_remaining() for rid, r in requests.items()})
        return history

    engine = Engine(llada, config)
    real = {str(i): engine.make_request(str(i), [7] * prompt, p) for i, (prompt, p) in enumerate(specs)}
    for request in real.values():
        engine.add(request)
    real_history = masked_after_each_step(engine.step, real)

    replica = StepReplica("r", ReplicaGroup("g", engine=config), AcceptanceModel(), seed=3)
    sim = {str(i): Request(str(i), [0] * prompt, p, MASK_ID, frozenset(), 0.0, None) for i, (prompt, p) in enumerate(specs)}
    for request in sim.values():
        replica.scheduler.add(request)
    now = [0.0]

    def sim_step():
        now[0] = replica.start_step(now[0])
        replica.finish_step(now[0])

    assert masked_after_each_step(sim_step, sim) == real_history
    assert [r.counters.num_steps for r in sim.values()] == [8, 2, 6, 9]
    # The first request's first block: 10 positions over 4 steps, remainder first.
    assert [h["0"] for h in real_history[:4]] == [17, 14, 12, 10]
