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


# An 8B model on a GPU, roughly: a step's reuse part is nearly flat (weight reads), a refresh
# of a 512-token sequence costs ~4x a reuse step.
GPU_LIKE = StepCost(fixed_s=6e-3, per_token_s=4.7e-5, per_context_s=0.0)


def long_request(i: int) -> Request:
    return Request(f"q{i}", [1] * 480, SamplingParams(max_tokens=256, block_size=32), MASK, frozenset({98}), float(i),
                   threshold=0.9)


def closed_loop_running(s: Scheduler, concurrency: int, steps: int, decided_per_step: int) -> list[int]:
    """Steps the scheduler alone (each query set decides its first ``decided_per_step``
    positions), keeping ``concurrency`` requests in the system; returns the running count a step."""
    from dilaserve.engine.plan import Decision, StepOutput

    added = 0
    counts = []
    for _ in range(steps):
        while len(s.waiting) + len(s.running) < concurrency:
            s.add(long_request(added))
            added += 1
        plan = s.schedule()
        counts.append(len(plan.items))
        decisions = {}
        for item in plan.items:
            positions = item.query_positions[:decided_per_step]
            decisions[item.request.request_id] = Decision(tuple(positions), tuple(5 for _ in positions))
        s.update(plan, StepOutput(decisions))
    return counts


def test_auto_refresh_bound_keeps_up_with_the_refresh_demand(monkeypatch):
    """64 requests decoding 8 tokens a step refresh every 4 steps: the bound must let ~16
    refreshes a step through, or the running set shrinks to what one refresh a step sustains."""
    def run():
        s = scheduler(GPU_LIKE, refresh_bound="auto", refresh_slowdown=1.0, max_running=64,
                      max_refresh_tokens=1 << 20, max_batch_tokens=1 << 20)
        s.tokens_per_step = lambda r: 8.0
        return closed_loop_running(s, 64, 80, 8)

    counts = run()
    assert min(counts[20:]) >= 60, counts
    # With the slowdown term alone (the rule before the demand term) the batch collapsed.
    from dilaserve.engine import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "REFRESH_CATCH_UP", 0.0)
    assert sum(run()[20:]) / 60 < 20


def test_auto_refresh_bound_staggers_a_burst_of_block_starts():
    """All 64 requests reach a block start in the same step: about REFRESH_CATCH_UP x the mean
    demand (64 refreshes every 4 steps -> ~20) run now, the rest in the next steps."""
    from dilaserve.engine.request import RequestStatus

    s = scheduler(GPU_LIKE, refresh_bound="auto", refresh_slowdown=1.0, max_running=64,
                  max_refresh_tokens=1 << 20, max_batch_tokens=1 << 20)
    s.tokens_per_step = lambda r: 8.0
    for i in range(64):
        r = long_request(i)
        r.has_cache, r.step_in_block = True, 0
        r.pages = s.allocator.allocate(r.kv_tokens)
        r.set_status(RequestStatus.RUNNING)
        s.running.append(r)
    plan = s.schedule()
    refreshes = sum(item.is_refresh for item in plan.items)
    assert 16 <= refreshes <= 24


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


def test_memory_model_of_the_fused_block_counts_mlp_slices():
    m = StepMemoryModel(**SPEC, dtype_bytes=2, fused_block=True, mlp_chunk_tokens=8)
    # (4 + b) d T + max((4 (d + 2kv) + 2bd) T, (8 + 2b) f min(T, C)) (float32 q | k | v and
    # gate | up products): below C the MLP's 12 f = 1536 bytes per token lead...
    assert m.forward_bytes(4) == 6 * 64 * 4 + max((4 * 192 + 256) * 4, 1536 * 4)
    # ...above it the MLP slice stays at C tokens and attention's temporaries take over.
    assert m.forward_bytes(100) == 6 * 64 * 100 + max((4 * 192 + 256) * 100, 1536 * 8)
    unfused = StepMemoryModel(**SPEC, dtype_bytes=2)
    assert m.forward_bytes(100) < unfused.forward_bytes(100)
    # The torch-free model repeats the fused block's slice size; the two must not drift apart.
    from dilaserve.models.layers import MLP_CHUNK_TOKENS

    assert StepMemoryModel(**SPEC).mlp_chunk_tokens == MLP_CHUNK_TOKENS


def test_memory_model_of_the_one_kernel_swiglu():
    """With gate | up and silu x up in one kernel a slice holds only silu x up (b f per row), but
    steps of at most 32 rows still take float32 products (the skinny GEMM + silu_mul)."""
    m = StepMemoryModel(**SPEC, dtype_bytes=2, fused_block=True, mlp_chunk_tokens=300, fused_mlp=True)
    attn = 4 * 192 + 256  # bytes per token of the attention temporaries (d 64, kv 64)
    assert m.forward_bytes(20) == 6 * 64 * 20 + max(attn * 20, 1536 * 20)  # small: float32 products
    assert m.forward_bytes(1000) == 6 * 64 * 1000 + max(attn * 1000, 2 * 128 * 300, 1536 * 32)
    # at 300 tokens the float32 products' slice (1536 x 300) would lead; silu x up alone does not
    composed = StepMemoryModel(**SPEC, dtype_bytes=2, fused_block=True, mlp_chunk_tokens=300)
    assert composed.forward_bytes(300) == 6 * 64 * 300 + 1536 * 300
    assert m.forward_bytes(300) == 6 * 64 * 300 + attn * 300


def test_the_engine_prices_memory_with_its_block_ops():
    """``StepMemoryModel.for_spec(block_ops=...)`` takes the fast path's MLP slice size and kernel."""
    import dataclasses

    from types import SimpleNamespace

    from dilaserve.models.layers import BlockOps

    spec = SimpleNamespace(**SPEC)

    ops = BlockOps(None, None, None, None, linear_swiglu=lambda *a, **k: None, mlp_chunk_tokens=4096)
    m = StepMemoryModel.for_spec(spec, 2, block_ops=ops)
    assert (m.fused_block, m.mlp_chunk_tokens, m.fused_mlp) == (True, 4096, True)
    m = StepMemoryModel.for_spec(spec, 2, block_ops=dataclasses.replace(ops, linear_swiglu=None))
    assert (m.mlp_chunk_tokens, m.fused_mlp) == (4096, False)
    assert (StepMemoryModel.for_spec(spec, 2).fused_block, StepMemoryModel.for_spec(spec, 2).fused_mlp) == (False, False)


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
