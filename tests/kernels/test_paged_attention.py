"""The paged attention kernel computes PagedAttention's function (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

from dilaserve.models.paged_attention import PagedAttention, PagedKVCache
from kernels.paged_attention import paged_attention, paged_attention_reference, write_kv_, write_kv_reference

# ||out - ref|| / ||ref|| against a float64 reference (see the device METHOD notes).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_case(query_counts, context_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device, seed=0):
    """Random pools with NaN in every slot no request owns, pages scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_req = [-(-c // page_size) for c in context_lens]
    num_pages = sum(pages_per_req) + 3
    order = torch.randperm(num_pages, generator=gen)
    max_pages = max(pages_per_req)
    tables = torch.zeros(len(context_lens), max_pages, dtype=torch.int32)
    owned = torch.zeros(num_pages * page_size, dtype=torch.bool)
    used = 0
    for r, (n, length) in enumerate(zip(pages_per_req, context_lens)):
        tables[r, :n] = order[used:used + n].int()
        used += n
        pos = torch.arange(length)
        owned[tables[r].long()[pos // page_size] * page_size + pos % page_size] = True
    shape = (num_pages * page_size, num_kv_heads, head_dim)
    k_pool = torch.randn(shape, generator=gen)
    v_pool = torch.randn(shape, generator=gen)
    k_pool[~owned] = torch.nan
    v_pool[~owned] = torch.nan
    q = torch.randn(sum(query_counts), num_heads, head_dim, generator=gen)
    starts = torch.tensor([0, *torch.tensor(query_counts).cumsum(0).tolist()], dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(q.to(dtype)), to(k_pool.to(dtype)), to(v_pool.to(dtype)), to(starts), to(tables),
            to(torch.tensor(context_lens, dtype=torch.int32)))


CASES = [
    # query counts, context lengths, heads, kv heads, head dim, page size, dtype
    pytest.param([3, 1, 7], [20, 5, 33], 8, 2, 16, 4, torch.float32, id="gqa4-fp32-d16"),
    pytest.param([5, 1, 2], [37, 9, 2], 7, 1, 48, 8, torch.bfloat16, id="mqa7-bf16-d48"),
    pytest.param([1, 9], [17, 40], 4, 4, 64, 16, torch.float16, id="mha-fp16-d64"),
    pytest.param([2, 0, 3], [70, 4, 19], 4, 1, 128, 16, torch.bfloat16, id="gqa4-bf16-d128-empty-req"),
]


# Key splits: None is the automatic choice (1 on the interpreter); 2 splits the longer contexts
# (keys stream in tiles of 64); 8 leaves several splits of every request empty.
@pytest.mark.parametrize("num_splits", [None, 2, 8])
@pytest.mark.parametrize("query_counts, context_lens, heads, kv_heads, head_dim, page_size, dtype", CASES)
def test_kernel_matches_reference(query_counts, context_lens, heads, kv_heads, head_dim, page_size, dtype, num_splits,
                                  device):
    args = make_case(query_counts, context_lens, heads, kv_heads, head_dim, page_size, dtype, device)
    out = torch.full_like(args[0], torch.nan)
    paged_attention(*args, page_size, out=out, num_splits=num_splits)
    assert not out.isnan().any(), "every query row is written and no unowned (NaN) slot is read"
    ref = paged_attention_reference(*(a.double() if a.is_floating_point() else a for a in args), page_size)
    assert rel_err(out, ref) <= TOLERANCE[dtype]


CAUSAL_CASES = [
    # query counts, context lengths, first query position, block size, heads, kv heads, head dim, page, dtype
    pytest.param([4, 1, 8], [8, 13, 24], [4, 12, 16], 4, 4, 2, 24, 4, torch.float32, id="sdar-fp32-d24"),
    pytest.param([40, 3], [40, 70], [0, 67], 8, 8, 2, 64, 16, torch.bfloat16, id="prefill-bf16-d64"),
    pytest.param([5], [133], [128], 4, 2, 2, 16, 8, torch.float16, id="long-context-fp16"),
    # One query tile spans positions 60..91: with 2 key splits (0..63, 64..95) the rows below 64
    # see no key of the second split.
    pytest.param([32], [96], [60], 4, 2, 2, 16, 8, torch.float32, id="row-without-keys-in-a-split"),
]


@pytest.mark.parametrize("num_splits", [None, 2])
@pytest.mark.parametrize("query_counts, context_lens, first_pos, block, heads, kv_heads, head_dim, page_size, dtype",
                         CAUSAL_CASES)
def test_block_causal_kernel_matches_reference(query_counts, context_lens, first_pos, block, heads, kv_heads,
                                               head_dim, page_size, dtype, num_splits, device):
    args = make_case(query_counts, context_lens, heads, kv_heads, head_dim, page_size, dtype, device, seed=5)
    q_start = torch.tensor(first_pos, dtype=torch.int32, device=device)
    out = torch.full_like(args[0], torch.nan)
    paged_attention(*args, page_size, out=out, causal_block_size=block, query_pos_start=q_start,
                    num_splits=num_splits)
    assert not out.isnan().any()
    ref = paged_attention_reference(*(a.double() if a.is_floating_point() else a for a in args), page_size,
                                    causal_block_size=block, query_pos_start=q_start)
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    # The mask matters: the bidirectional answer differs wherever a query sees past its block.
    full = paged_attention_reference(*(a.double() if a.is_floating_point() else a for a in args), page_size)
    assert rel_err(full, ref) > 1e-3


def test_num_splits_must_be_a_power_of_two(device):
    args = make_case([2], [10], 2, 1, 16, 4, torch.float32, device)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(*args, 4, num_splits=3)


def test_block_causal_reference_is_the_torch_backend(device):
    """The kernel's (query_pos_start, block) form means what PagedAttention's block-causal mask does."""
    query_counts, context_lens, page_size, block = [4, 3], [12, 11], 4, 4
    q, k_pool, v_pool, starts, tables, lens = make_case(query_counts, context_lens, 4, 2, 16, page_size,
                                                       torch.float32, device, seed=6)
    k_pool, v_pool = k_pool.nan_to_num(0.0), v_pool.nan_to_num(0.0)
    cache = PagedKVCache(1, k_pool.shape[0] // page_size, page_size, 2, 16, torch.float32, device)
    cache.k[0].copy_(k_pool)
    cache.v[0].copy_(v_pool)
    backend = _torch_backend(cache, query_counts, context_lens, tables, page_size, slot_mapping=None)
    first = torch.tensor([n - c for n, c in zip(context_lens, query_counts)])  # queries end their contexts
    offs = torch.arange(max(query_counts))
    backend.query_positions = (first.unsqueeze(1) + offs).to(device)
    backend.causal_block_size = block
    slots = backend.slot_mapping
    out = backend(0, q, k_pool[slots], v_pool[slots])
    ref = paged_attention_reference(q, k_pool, v_pool, starts, tables, lens, page_size, causal_block_size=block,
                                    query_pos_start=first.to(torch.int32).to(device))
    assert rel_err(out, ref) <= 1e-6


def test_reference_is_the_torch_backend(device):
    """The compact (offsets, page tables) signature means what PagedAttention's padded one does."""
    query_counts, context_lens, page_size = [3, 1, 6], [11, 5, 24], 4
    q, k_pool, v_pool, starts, tables, lens = make_case(query_counts, context_lens, 4, 2, 16, page_size,
                                                       torch.float32, device)
    # The padded torch layout reads slot 0 for padding (masked, but NaN * 0 is NaN): no poison.
    k_pool, v_pool = k_pool.nan_to_num(0.0), v_pool.nan_to_num(0.0)
    cache = PagedKVCache(1, k_pool.shape[0] // page_size, page_size, 2, 16, torch.float32, device)
    cache.k[0].copy_(k_pool)
    cache.v[0].copy_(v_pool)
    backend = _torch_backend(cache, query_counts, context_lens, tables, page_size, slot_mapping=None)
    # Write each query's own k, v back unchanged: the backend then only attends.
    slots = backend.slot_mapping
    out = backend(0, q, k_pool[slots], v_pool[slots])
    ref = paged_attention_reference(q, k_pool, v_pool, starts, tables, lens, page_size)
    assert rel_err(out, ref) <= 1e-6


def _torch_backend(cache, query_counts, context_lens, tables, page_size, slot_mapping):
    """PagedAttention's padded layout for requests whose queries are the last positions of
    their contexts (as a reuse step of a block at the end of the sequence)."""
    device = cache.k[0].device
    num_req, q_max, l_max = len(query_counts), max(query_counts), max(context_lens)
    query_index = torch.zeros(num_req, q_max, dtype=torch.long)
    query_valid = torch.zeros(num_req, q_max, dtype=torch.bool)
    key_slots = torch.zeros(num_req, l_max, dtype=torch.long)
    key_valid = torch.zeros(num_req, l_max, dtype=torch.bool)
    own_slots, start = [], 0
    for r, (nq, length) in enumerate(zip(query_counts, context_lens)):
        pos = torch.arange(length)
        slots = tables[r].long().cpu()[pos // page_size] * page_size + pos % page_size
        key_slots[r, :length], key_valid[r, :length] = slots, True
        query_index[r, :nq], query_valid[r, :nq] = torch.arange(start, start + nq), True
        own_slots.append(slots[length - nq:])
        start += nq
    slot_mapping = torch.cat(own_slots) if slot_mapping is None else slot_mapping
    return PagedAttention(cache, slot_mapping.to(device), query_index.to(device), query_valid.to(device),
                          key_slots.to(device), key_valid.to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_torch_backend(dtype, device):
    """Same constructor, same call: writes land in the same slots and outputs agree."""
    pytest.importorskip("triton")
    from dilaserve.engine.gpu.attention import TritonPagedAttention

    query_counts, context_lens, page_size, heads, kv_heads, head_dim = [4, 1, 9], [13, 6, 30], 4, 8, 2, 16
    q, k_pool, v_pool, _, tables, _ = make_case(query_counts, context_lens, heads, kv_heads, head_dim,
                                                page_size, dtype, device, seed=3)
    k_pool, v_pool = k_pool.nan_to_num(0.0), v_pool.nan_to_num(0.0)
    gen = torch.Generator().manual_seed(4)
    k_new = torch.randn(q.shape[0], kv_heads, head_dim, generator=gen).to(device, dtype)
    v_new = torch.randn(q.shape[0], kv_heads, head_dim, generator=gen).to(device, dtype)
    outs, pools = [], []
    for use_triton in (False, True):
        cache = PagedKVCache(1, k_pool.shape[0] // page_size, page_size, kv_heads, head_dim, dtype, device)
        cache.k[0].copy_(k_pool)
        cache.v[0].copy_(v_pool)
        backend = _torch_backend(cache, query_counts, context_lens, tables, page_size, slot_mapping=None)
        if use_triton:
            backend = TritonPagedAttention.from_backend(backend)
        outs.append(backend(0, q, k_new, v_new))
        pools.append((cache.k[0].clone(), cache.v[0].clone()))
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    assert rel_err(outs[1], outs[0]) <= TOLERANCE[dtype]


def test_write_kv_stores_at_slots(device):
    k_pool = torch.zeros(10, 2, 4, device=device)
    v_pool = torch.zeros(10, 2, 4, device=device)
    k, v = torch.randn(3, 2, 4, device=device), torch.randn(3, 2, 4, device=device)
    slots = torch.tensor([7, 0, 3], device=device)
    write_kv_(k_pool, v_pool, slots, k, v)
    assert torch.equal(k_pool[slots], k) and torch.equal(v_pool[slots], v)
    assert k_pool.abs().sum(dim=(1, 2)).count_nonzero() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_matches_reference_on_strided_views(dtype, device):
    """k and v as column slices of one packed QKV output (5 kv heads of 24: awkward sizes)."""
    gen = torch.Generator().manual_seed(4)
    tokens, kv_heads, head_dim = 7, 5, 24
    qkv = torch.randn(tokens, 3 * kv_heads * head_dim, generator=gen).to(dtype).to(device)
    _, k, v = (t.view(tokens, kv_heads, head_dim) for t in qkv.split(kv_heads * head_dim, dim=1))
    slots = torch.tensor([11, 2, 30, 5, 0, 17, 29], device=device)
    pools = [torch.zeros(32, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(4)]
    write_kv_(pools[0], pools[1], slots, k, v)
    write_kv_reference(pools[2], pools[3], slots, k, v)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert pools[0].abs().sum(dim=(1, 2)).count_nonzero() == tokens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_heads", [32, 8])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_llada_shapes_on_gpu(dtype, kv_heads, num_splits):
    """LLaDA-8B heads (32 x 128), page 16: reuse query sets, a 1-query request and refreshes."""
    query_counts = [32, 1, 7, 512, 300]
    context_lens = [512, 77, 519, 512, 1000]
    args = make_case(query_counts, context_lens, 32, kv_heads, 128, 16, dtype, "cuda", seed=5)
    out = torch.full_like(args[0], torch.nan)
    paged_attention(*args, 16, out=out, num_splits=num_splits)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    ref = paged_attention_reference(*(a.double() if a.is_floating_point() else a for a in args), 16)
    assert rel_err(out, ref) <= TOLERANCE[dtype]
