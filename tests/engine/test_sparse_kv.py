"""Head-centric sparse KV: at retention 1.0 it is the dense dual cache, token for token; below,
each head keeps its own positions, reuse steps read fewer keys, and requests still decode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.engine.sparse_kv import SelectionJob, batch_jobs, copy_kept, kept_positions
from dilaserve.errors import InvalidRequestError
from dilaserve.models.paged_attention import PagedKVCache
from tests.engine.helpers import make_prompts, new_engine, run_to_completion


def _run(model, prompts, scratch=0, **params):
    requests = [(f"r{i}", p, SamplingParams(max_tokens=24 if i % 2 else 32, block_size=8, seed=i, cache="dual",
                                            **params)) for i, p in enumerate(prompts)]
    return run_to_completion(new_engine(model, sparse_scratch_tokens=scratch), requests)


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("decoding", [dict(threshold=0.7), dict(steps=24)])
@pytest.mark.parametrize("scratch", [0, 40])  # 40: some prompts live in scratch slots, a step holds two
def test_retention_one_reproduces_the_dense_dual_cache(model_name, decoding, scratch, request):
    model = request.getfixturevalue(model_name)
    prompts = make_prompts(6, seed=21)
    dense = _run(model, prompts, **decoding)
    sparse = _run(model, prompts, scratch=scratch, kv_retention=1.0, kv_smoothing=3, **decoding)
    assert {r: d[0] for r, d in sparse.items()} == {r: d[0] for r, d in dense.items()}


def test_with_a_scratch_region_prompts_hold_no_pages(llada):
    prompt_len, gen = 200, 32
    params = SamplingParams(max_tokens=gen, block_size=8, threshold=0.9, cache="dual", kv_retention=0.5)
    dense_engine, sparse_engine = new_engine(llada), new_engine(llada, sparse_scratch_tokens=256)
    used = {}
    for name, engine, p in (("dense", dense_engine, dataclasses.replace(params, kv_retention=None)),
                            ("sparse", sparse_engine, params)):
        request = engine.make_request(name, list(range(3, 3 + prompt_len)), p)
        engine.add(request)
        engine.step()
        used[name] = engine.allocator.num_pages - engine.allocator.num_free
        assert request.kv_offset == (prompt_len if name == "sparse" else 0)
        while engine.has_work():
            engine.step()
        assert engine.allocator.num_free == engine.allocator.num_pages
    # dense: 232 positions; sparse: 32 generated + ceil(0.5 * 232) = 148 slots (8-token pages)
    assert used == {"dense": 29, "sparse": 19}
    # A prompt longer than the scratch keeps its pages.
    assert sparse_engine.make_request("long", list(range(3, 303)), params).kv_offset == 0


def test_half_retention_reads_fewer_keys_and_still_decodes(llada):
    prompts = make_prompts(4, seed=3, lo=40, hi=60)
    engine = new_engine(llada)
    params = SamplingParams(max_tokens=32, block_size=8, threshold=0.9, cache="dual", kv_retention=0.5)
    for i, p in enumerate(prompts):
        engine.add(engine.make_request(f"s{i}", p, params))
    reads = []
    while engine.has_work():
        outputs, plan = engine.begin_step()
        if plan:
            for item in plan.items:
                if item.uses_sparse_kv:
                    r = item.request
                    # the kept half of what lies outside the block, then the block
                    assert r.sparse_count == -(-(r.seq_len - (r.block_end - r.block_start)) // 2)  # LLaDA: no lead
                    reads.append((item.num_context_tokens, r.seq_len))
            engine.end_step(plan, engine.runner.run(plan))
    assert reads and all(n < seq for n, seq in reads)
    assert engine.allocator.num_free == engine.allocator.num_pages  # sparse regions freed too


def test_each_head_keeps_the_positions_its_block_attends_to():
    torch.manual_seed(0)
    seq, block = (20, 28), (8, 12)
    k = torch.randn(seq[1], 2, 4) * 0.1
    q = torch.zeros(4, 4, 4)  # 4 block queries, 4 query heads over 2 KV heads
    # Head 0's queries point at the keys of positions 2 and 3; head 1's at 25.
    k[2, 0] = k[3, 0] = torch.tensor([8.0, 0, 0, 0])
    k[25, 1] = torch.tensor([0, 8.0, 0, 0])
    q[:, 0:2, 0] = 1.0
    q[:, 2:4, 1] = 1.0
    kept = kept_positions(q, k, *block, keep=2, smoothing=1)
    assert kept[0].tolist() == [2, 3]
    assert 25 in kept[1].tolist()
    assert not any(block[0] <= p < block[1] for p in kept.flatten().tolist())  # never the block itself
    assert (kept.diff(dim=-1) > 0).all()  # ascending
    # Smoothing spreads a peak's score to its neighbours: a lone peak's neighbour beats a far key.
    smooth = kept_positions(q, k, *block, keep=3, smoothing=3)
    assert set(smooth[1].tolist()) >= {24, 25, 26}
    # The copy: slot j of head h holds head h's j-th kept position.
    cache = PagedKVCache(1, 4, 4, 2, 4, torch.float32, "cpu")
    dst = torch.tensor([5, 6])
    v = torch.randn_like(k)
    copy_kept(cache, 0, k, v, kept, dst)
    for h in range(2):
        for j, p in enumerate(kept[h].tolist()):
            assert torch.equal(cache.k[0][dst[j], h], k[p, h]) and torch.equal(cache.v[0][dst[j], h], v[p, h])


def test_sparse_kv_settings_are_checked(llada, sdar):
    engine = new_engine(llada)
    for bad, says in ((dict(kv_retention=0.0), "kv_retention must be in"), (dict(kv_retention=1.5), "kv_retention"),
                      (dict(kv_retention=0.5, cache="prefix"), "needs cache 'dual'"),
                      (dict(kv_retention=0.5, refresh_interval=2), "refresh_interval"),
                      (dict(kv_smoothing=4), "odd")):
        with pytest.raises(InvalidRequestError, match=says):
            engine.make_request("x", [1, 2], SamplingParams(max_tokens=8, block_size=8, **bad))
    with pytest.raises(InvalidRequestError, match="block-causal"):
        new_engine(sdar).make_request("x", [1, 2], SamplingParams(max_tokens=8, block_size=4, cache="dual",
                                                                   kv_retention=0.5))


def test_cost_model_prices_the_keys_sparse_reuse_steps_read():
    from dilaserve.engine.cost_model import request_work

    dense = request_work(600, 64, 32, 4.0, "dual")
    assert request_work(600, 64, 32, 4.0, "dual", kv_retention=1.0) == dense
    half = request_work(600, 64, 32, 4.0, "dual", kv_retention=0.5)
    assert (half.steps, half.tokens, half.queries) == (dense.steps, dense.tokens, dense.queries)
    # 2 refreshes read 600 keys, 14 reuse steps read 32 + 284
    assert half.context_tokens == 2 * 600 + 14 * (32 + 284)
    assert half.context_tokens < dense.context_tokens and half.pairs < dense.pairs


def _random_jobs(gen, num_jobs, page_slots):
    """Jobs of different lengths, windows, keeps and smoothing over consecutive packed rows."""
    jobs, row, slot = [], 0, 0
    for _ in range(num_jobs):
        seq_len = int(torch.randint(6, 40, (1,), generator=gen))
        start = int(torch.randint(0, seq_len - 2, (1,), generator=gen))
        end = min(seq_len, start + int(torch.randint(1, 9, (1,), generator=gen)))
        outside = seq_len - (end - start)
        keep = int(torch.randint(0, outside + 1, (1,), generator=gen)) if outside else 0
        # Windows no wider than what they smooth: wider ones average everything alike, an exact
        # tie that either path may break its own way.
        widths = [w for w in (1, 3, 5) if w <= max(outside, 1)]
        smoothing = widths[int(torch.randint(0, len(widths), (1,), generator=gen))]
        dst = torch.arange(page_slots + slot, page_slots + slot + keep + 2)  # a region may be larger than keep
        jobs.append(SelectionJob(row, seq_len, start, end, keep, smoothing, dst))
        row, slot = row + seq_len, slot + keep + 2
    return jobs, row, slot


def assert_batched_selection_equals_each_job(jobs, heads, q, k, v, num_slots):
    """Keeps and copies of the batched selection (``batch_jobs`` on q's device) equal those of
    each job's own ``kept_positions`` + ``copy_kept``, exactly."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    pages = (64 + num_slots) // 4 + 1
    batched = PagedKVCache(1, pages, 4, kv_heads, head_dim, k.dtype, k.device)
    alone = PagedKVCache(1, pages, 4, kv_heads, head_dim, k.dtype, k.device)
    [selection] = batch_jobs(jobs, heads, q.device)
    assert len(selection.jobs) == sum(j.keep > 0 for j in jobs) >= 2
    got = selection.kept_positions(q, k)
    selection.select_and_copy(batched, 0, q, k, v)
    for i, job in enumerate(selection.jobs):
        rows = slice(job.row_start, job.row_start + job.seq_len)
        q_block = q[job.row_start + job.block_start: job.row_start + job.block_end]
        want = kept_positions(q_block, k[rows], job.block_start, job.block_end, job.keep, job.smoothing)
        assert torch.equal(got[i, :, :job.keep], want), (job, got[i], want)
        copy_kept(alone, 0, k[rows], v[rows], want, job.dst_slots)
    assert torch.equal(batched.k[0], alone.k[0]) and torch.equal(batched.v[0], alone.v[0])


@pytest.mark.parametrize("seed", range(6))
def test_batched_selection_keeps_and_copies_what_each_job_alone_does(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 4, 2, 8
    jobs, num_rows, num_slots = _random_jobs(gen, 7, 64)
    q = torch.randn(num_rows, heads, head_dim, generator=gen)
    k = torch.randn(num_rows, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_rows, kv_heads, head_dim, generator=gen)
    assert_batched_selection_equals_each_job(jobs, heads, q, k, v, num_slots)


def test_selection_batches_stay_within_the_score_budget(monkeypatch):
    from dilaserve.engine import sparse_kv

    gen = torch.Generator().manual_seed(0)
    jobs, _, _ = _random_jobs(gen, 12, 0)
    monkeypatch.setattr(sparse_kv, "_SCORE_BYTES", 4 * 4 * 8 * 40 * 3)  # about three jobs' scores
    batches = batch_jobs(jobs, 4, torch.device("cpu"))
    assert len(batches) > 1
    assert sorted(id(j) for b in batches for j in b.jobs) == sorted(id(j) for j in jobs if j.keep > 0)
