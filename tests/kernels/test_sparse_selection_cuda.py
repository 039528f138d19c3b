"""Sparse-KV selection on a GPU: the batched selection the engine uses there keeps and copies,
in bf16 caches, what each job's own selection does (the CPU test checks the same in float32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dilaserve.engine.sparse_kv import SparseSelectingAttention
from dilaserve.models.paged_attention import PagedKVCache
from tests.engine.test_sparse_kv import _random_jobs, assert_batched_selection_equals_each_job


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
    cache = PagedKVCache(1, (64 + num_slots) // 4 + 1, 4, kv_heads, head_dim, torch.bfloat16, device)
    wrapper = SparseSelectingAttention(lambda layer, q_, k_, v_: q_, cache, jobs)
    assert wrapper(0, q, k, v) is q and wrapper._batches  # on a GPU the engine's wrapper batches
    assert_batched_selection_equals_each_job(jobs, heads, q, k, v, num_slots)
