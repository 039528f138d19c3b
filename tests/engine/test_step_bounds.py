"""Scheduler bounds derived from the cost model and the memory model (both off by default)."""

import pytest

from dilaserve.engine.acceptance_profile import AcceptanceProfile
from dilaserve.engine.chunk_control import FixedChunk
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import StepCost
from dilaserve.engine.kv_pages import PageAllocator
from dilaserve.engine.memory import MemoryTally, StepMemoryModel
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.engine.scheduler import Scheduler

MASK = 99


def request(i: int, prompt_len: int = 96, running: bool = False) -> Request:
    r = Request(f"r{i}", [1] * prompt_len, SamplingParams(max_tokens=32, block_size=32), MASK, frozenset({98}), float(i),
                threshold=0.9)
    if running:
        r.has_cache, r.step_in_block = True, 1
    return r


def scheduler(cost: StepCost | None = None, memory: StepMemoryModel | None = None, **config) -> Scheduler:
    cfg = EngineConfig(num_pages=4096, page_size=16, **config)
    return Scheduler(cfg, PageAllocator(4096, 16), FixedChunk(), False, lambda: 0.0,
                     step_cost=(lambda: cost) if cost else None, memory=memory)


def with_running(s: Scheduler, n: int) -> None:
    from dilaserve.engine.request import RequestStatus

    for i in range(n):
        r = request(100 + i, running=True)
        r.pages = s.allocator.allocate(r.seq_len)
        r.set_status(RequestStatus.RUNNING)
        s.running.append(r)


def test_auto_refresh_bound_follows_the_cost_model():
    # reuse part: 8 requests x 32 tokens = 256 tokens -> 10 ms + 256 x 0.1 ms = 35.6 ms; a refresh of
    # 128 tokens adds 12.8 ms, so slowdown 1.0 admits two refreshes (25.6 ms), not three (38.4 ms).
    cost = StepCost(fixed_s=10e-3, per_token_s=1e-4, per_context_s=0.0)
    s = scheduler(cost, refresh_bound="auto", refresh_slowdown=1.0, max_refresh_tokens=1 << 20, max_batch_tokens=1 << 20)
    with_running(s, 8)
    for i in range(6):
        s.add(request(i))
    plan = s.schedule()
    assert plan.num_refresh_tokens == 2 * 128
    # a profile where refreshes are cheap admits them all; "fixed" ignores the cost model
    flat = StepCost(fixed_s=10e-3, per_token_s=1e-7, per_context_s=0.0)
    s = scheduler(flat, refresh_bound="auto", max_refresh_tokens=1 << 20, max_batch_tokens=1 << 20)
    with_running(s, 8)
    for i in range(6):
        s.add(request(i))
    assert s.schedule().num_refresh_tokens == 6 * 128
    s = scheduler(cost, max_refresh_tokens=1 << 20, max_batch_tokens=1 << 20)
    with_running(s, 8)
    for i in range(6):
        s.add(request(i))
    assert s.schedule().num_refresh_tokens == 6 * 128


def test_first_refresh_always_runs_under_auto():
    s = scheduler(StepCost(fixed_s=1.0, per_token_s=1.0, per_context_s=0.0), refresh_bound="auto")
    s.add(request(0))
    assert s.schedule().num_refresh_tokens == 128


def test_unknown_refresh_bound_is_refused():
    with pytest.raises(ValueError, match="refresh_bound"):
        scheduler(refresh_bound="sometimes")


SPEC = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4, head_dim=16, vocab_size=1000)


def test_memory_model_by_hand():
    m = StepMemoryModel(**SPEC, dtype_bytes=2)
    # forward: T x (2 x (2 x 64 + max(3 x 64 + 2 x 64, 4 x 128)) + 12 x 64) = T x (2 x 640 + 768) = 2048 T
    assert m.forward_bytes(10) == 20480
    # attention: R x (2 L H D b + Q H D b + H Q L 4) = 2 x (2*100*4*16*2 + 5*4*16*2 + 4*5*100*4)
    assert m.attention_bytes(2, 5, 100) == 2 * (25600 + 640 + 8000)
    # logits: rows x V x (2 + 4 + 8 + 8) on the torch path; rows x splits x 12 fused
    assert m.logit_bytes(3) == 3 * 1000 * 22
    assert m.logit_bytes(3, fused=True) == 3 * 64 * 12
    assert m.step_bytes(10, 3, 2, 5, 100) == max(20480 + 2 * (25600 + 640 + 8000), 10 * 64 * 2 + 66000)
    fused = StepMemoryModel(**SPEC, dtype_bytes=2, fused_logits=True, padded_attention=False)
    assert fused.step_bytes(10, 3, 2, 5, 100) == 20480


def test_memory_budget_caps_the_batch():
    m = StepMemoryModel(**SPEC, dtype_bytes=4)
    one_reuse = m.step_bytes(32, 32, 1, 32, 128)
    budget_gib = 3.5 * one_reuse / 2**30  # room for about three reuse steps' worth
    s = scheduler(memory=m, step_memory_gib=budget_gib)
    with_running(s, 10)
    plan = s.schedule()
    assert 1 <= len(plan.items) < 10
    tally = MemoryTally(m, budget_gib * 2**30)
    for item in plan.items:
        tally.add(item)
    assert tally.bytes <= budget_gib * 2**30
    # off by default: every running request runs
    s = scheduler(memory=m)
    with_running(s, 10)
    assert len(s.schedule().items) == 10


def test_a_request_larger_than_the_budget_still_runs_alone():
    s = scheduler(memory=StepMemoryModel(**SPEC), step_memory_gib=1e-9)
    with_running(s, 3)
    assert len(s.schedule().items) == 1


def test_acceptance_profile_reads_histograms():
    data = {"block_size": 32, "entries": [
        {"threshold": 0.9, "queried": 4, "histogram": [0, 0, 0, 10]},
        {"threshold": 0.9, "queried": 8, "histogram": [10, 0, 0, 0, 0, 0, 0, 0]},
        {"threshold": 0.5, "queried": 4, "histogram": [10, 10, 0, 0]}]}
    p = AcceptanceProfile(data)
    import numpy as np

    rng = np.random.default_rng(0)
    assert p.mean(0.9, 4) == 4.0 and p.mean(0.9, 8) == 1.0
    assert p.mean(0.88, 6) == 4.0  # nearest threshold, largest measured size not above
    assert p.mean(0.5, 4) == 1.5 and p.mean(0.45, 4) == 1.5
    assert p.mean(0.9, 2) == 2.0  # below every measured size: the tail folds into the cap
    assert all(1 <= p.draw(rng, 0.5, 4) <= 2 for _ in range(50))
    assert p.draw(rng, 0.9, 1) == 1


def test_shipped_acceptance_profile_is_valid():
    from dilaserve.planner.profiles import DEFAULT_PROFILES_DIR

    p = AcceptanceProfile.load(DEFAULT_PROFILES_DIR / "acceptance_dilaserve-tiny-arith.json")
    assert 1.0 <= p.mean(0.9, 4) <= 4.0 and p.mean(0.9, 32) >= p.mean(0.9, 4)
