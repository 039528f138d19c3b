"""Sparse-KV selection on a GPU: the batched selection the engine uses there keeps and copies,
in bf16 caches, what each job's own selection does (the CPU test checks the same in float32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dilaserve.engine.sparse_kv import SparseSelectingAttention, batch_jobs, copy_kept, kept_positions
from dilaserve.models.paged_attention import PagedKVCache
from tests.engine.test_sparse_kv import _random_jobs


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_batched_selection_on_cuda_equals_each_job_alone(seed):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim = 8, 4, 64
    jobs, num_rows, num_slots = _random_jobs(gen, 9, 64)
    jobs = [dataclasses.replace(j, dst_slots=j.dst_slots.to(device)) for j in jobs]
    q = torch.randn(num_rows, heads, head_dim, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(num_rows, kv_heads, head_dim, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(num_rows, kv_heads, head_dim, generator=gen).to(device, torch.bfloat16)
    pages = (64 + num_slots) // 4 + 1
    batched = PagedKVCache(1, pages, 4, kv_heads, head_dim, torch.bfloat16, device)
    alone = PagedKVCache(1, pages, 4, kv_heads, head_dim, torch.bfloat16, device)
    out = SparseSelectingAttention(lambda layer, q_, k_, v_: q_, batched, jobs)(0, q, k, v)
    assert out is q
    [selection] = batch_jobs(jobs, heads, device)
    got = selection.kept_positions(q, k)
    for i, job in enumerate(selection.jobs):
        rows = slice(job.row_start, job.row_start + job.seq_len)
        q_block = q[job.row_start + job.block_start: job.row_start + job.block_end]
        want = kept_positions(q_block, k[rows], job.block_start, job.block_end, job.keep, job.smoothing)
        assert torch.equal(got[i, :, :job.keep], want), (job, got[i], want)
        copy_kept(alone, 0, k[rows], v[rows], want, job.dst_slots)
    assert torch.equal(batched.k[0], alone.k[0]) and torch.equal(batched.v[0], alone.v[0])
