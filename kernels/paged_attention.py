"""Bidirectional attention of a packed batch of query sets against each request's paged KV.

The function (the same as ``dilaserve.models.paged_attention.PagedAttention`` after its write):

    for each request r, with queries q[query_start_loc[r] : query_start_loc[r + 1]]:
        its keys / values are positions 0 .. context_lens[r] - 1 of its sequence, position p
        stored at slot block_tables[r, p // page_size] * page_size + p % page_size of the pools;
        out[i, h] = softmax(q[i, h] . K[:, h // G]^T * scale) @ V[:, h // G]   (G = H / KVH)

No causal mask: a query sees every stored position of its sequence, its own query set
included (its k, v must already be written, see ``write_kv_``). The same call serves refresh
steps (every position queried) and reuse steps (a query set over a cached context).

Block-causal models (SDAR) pass ``causal_block_size`` B and ``query_pos_start`` [R]: request
r's queries are positions ``query_pos_start[r] + i``, and a query at position p sees only keys
at positions below ``(p // B + 1) * B`` (its own block and the ones before).

Kernel: one program per (request, tile of its queries, kv head). The tile packs BLOCK_Q query
tokens x the G query heads that share the kv head into one [BLOCK_Q * G_pad, D] matrix, so a
K/V tile is loaded once for the whole group. Keys stream in tiles of BLOCK_N through the page
table with a flash-style online softmax (running max and sum, exp2, float32 accumulation).
Head sizes that are not a power of two are padded to the next one by masking.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.interpreter import interpreting


@triton.jit(do_not_specialize=["stride_bt", "scale_log2"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    query_start_loc_ptr, block_tables_ptr, context_lens_ptr, query_pos_start_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_bt,
    scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, F32_DOT: tl.constexpr,
    CAUSAL_BLOCK: tl.constexpr,
):
    req = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_begin = tl.load(query_start_loc_ptr + req)
    num_queries = tl.load(query_start_loc_ptr + req + 1) - q_begin
    if q_tile * BLOCK_Q >= num_queries:
        return
    context_len = tl.load(context_lens_ptr + req)

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = q_tile * BLOCK_Q + rows // GROUP_PAD
    member = rows % GROUP_PAD
    head = kv_head * GROUP + member
    row_ok = (token < num_queries) & (member < GROUP)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_begin + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)

    if CAUSAL_BLOCK > 0:
        # Keys visible to each row end with its query's block; the tile's last row sees furthest.
        q_pos = tl.load(query_pos_start_ptr + req) + token
        key_limit = (q_pos // CAUSAL_BLOCK + 1) * CAUSAL_BLOCK
        context_len = tl.minimum(context_len, tl.max(tl.where(row_ok, key_limit, 0), 0))

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    for start in range(0, context_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_ok = pos < context_len
        page = tl.load(table + pos // PAGE_SIZE, mask=key_ok, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_kn + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
        if F32_DOT:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        if CAUSAL_BLOCK > 0:
            visible = key_ok[None, :] & (pos[None, :] < key_limit[:, None])
        else:
            visible = key_ok[None, :]
        scores = tl.where(visible, scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_vn + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _check(q, k_pool, v_pool, query_start_loc, block_tables, context_lens) -> tuple[int, int]:
    num_heads, num_kv_heads = q.shape[1], k_pool.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if k_pool.shape != v_pool.shape or q.shape[2] != k_pool.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}")
    if query_start_loc.shape[0] != block_tables.shape[0] + 1 or context_lens.shape[0] != block_tables.shape[0]:
        raise ValueError("query_start_loc must have one more entry than block_tables and context_lens have rows")
    return num_heads, num_kv_heads


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, query_start_loc: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int, *,
    max_queries: int | None = None, scale: float | None = None, out: torch.Tensor | None = None,
    causal_block_size: int = 0, query_pos_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path. q: [N, H, D] packed by request; k_pool / v_pool: [num_slots, KVH, D];
    query_start_loc: [R + 1] int32 offsets into q; block_tables: [R, max_pages] int32 page ids;
    context_lens: [R] int32 (>= 1 for a request with queries). ``max_queries`` bounds the
    queries of one request (default: read from query_start_loc, which synchronises; pass it
    to keep the call free of host syncs, e.g. under CUDA-graph capture). Block-causal models add
    ``causal_block_size`` and ``query_pos_start`` ([R] int32, see the module). Returns [N, H, D]."""
    num_heads, num_kv_heads = _check(q, k_pool, v_pool, query_start_loc, block_tables, context_lens)
    _check_causal(causal_block_size, query_pos_start, block_tables)
    head_dim = q.shape[2]
    if q.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
        raise ValueError("the head dimension of q and of the pools must be contiguous")
    out = torch.empty_like(q) if out is None else out
    num_requests = block_tables.shape[0]
    if q.shape[0] == 0 or num_requests == 0:
        return out
    if max_queries is None:
        max_queries = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Rows of the packed query tile (tokens x group): enough for tl.dot (>= 16), at most 64
    # (128 only pays for long refresh tiles of small heads).
    rows = min(64, max(16, triton.next_power_of_2(max_queries * group_pad)))
    rows = max(rows, group_pad)
    block_q = rows // group_pad
    block_n = 64 if block_d <= 128 else 32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grid = (num_requests, triton.cdiv(max_queries, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, out, query_start_loc, block_tables, context_lens,
        query_pos_start if causal_block_size else context_lens,  # unread when not block-causal
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        scale * 1.4426950408889634,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_Q=block_q,
        BLOCK_N=block_n, PAGE_SIZE=page_size, F32_DOT=q.dtype == torch.float32 or interpreting(),
        CAUSAL_BLOCK=causal_block_size, num_warps=4, num_stages=2,
    )
    return out


def _check_causal(causal_block_size: int, query_pos_start: torch.Tensor | None, block_tables: torch.Tensor) -> None:
    if causal_block_size < 0:
        raise ValueError(f"causal_block_size must be >= 0, got {causal_block_size}")
    if causal_block_size and (query_pos_start is None or query_pos_start.shape[0] != block_tables.shape[0]):
        raise ValueError("a block-causal call needs query_pos_start with one entry per request")


def paged_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, query_start_loc: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int, *,
    max_queries: int | None = None, scale: float | None = None, out: torch.Tensor | None = None,
    causal_block_size: int = 0, query_pos_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch path of ``paged_attention`` (same arguments), computed in float32."""
    num_heads, num_kv_heads = _check(q, k_pool, v_pool, query_start_loc, block_tables, context_lens)
    _check_causal(causal_block_size, query_pos_start, block_tables)
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for r in range(block_tables.shape[0]):
        begin, end = starts[r], starts[r + 1]
        if end == begin:
            continue
        pos = torch.arange(lens[r], device=q.device)
        slots = block_tables[r].long()[pos // page_size] * page_size + pos % page_size
        keys = k_pool[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        values = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[begin:end].float(), keys) * scale
        if causal_block_size:
            q_pos = int(query_pos_start[r]) + torch.arange(end - begin, device=q.device)
            visible = pos.unsqueeze(0) < ((q_pos // causal_block_size + 1) * causal_block_size).unsqueeze(1)
            scores = scores.masked_fill(~visible, float("-inf"))
        out[begin:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(out.dtype)
    return out


def write_kv_(k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
    """Stores the packed tokens' k, v [N, KVH, D] at their slots (before attention reads them)."""
    k_pool.index_copy_(0, slot_mapping, k)
    v_pool.index_copy_(0, slot_mapping, v)
