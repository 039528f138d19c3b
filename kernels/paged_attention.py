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

Kernel: one program per (request, tile of its queries, kv head, key split). The tile packs
BLOCK_Q query tokens x the G query heads that share the kv head into one [BLOCK_Q * G_pad, D]
matrix, so a K/V tile is loaded once for the whole group. Keys stream in tiles of BLOCK_N
through the page table with a flash-style online softmax (running max and sum, exp2, float32
accumulation). Head sizes that are not a power of two are padded to the next one by masking.

Key splits (flash-decoding): a small step (one request's block of 32 queries: 32 programs for
32 kv heads) leaves most of a GPU's SMs idle while each program walks the whole context. Then
each request's keys are cut into ``num_splits`` ranges, one program each, which write their
normalised partial output and log-sum-exp; a second kernel merges the splits (weights
``exp2(lse_s - max lse)``). ``num_splits`` is chosen on the host from the grid size alone (no
sync), so a step stays capturable; an empty range writes a log-sum-exp of -inf and weighs 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.interpreter import interpreting


@triton.jit(do_not_specialize=["stride_bt", "scale_log2", "num_tokens"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, partial_ptr, lse_ptr,
    query_start_loc_ptr, block_tables_ptr, context_lens_ptr, query_pos_start_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_bt,
    scale_log2, num_tokens,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, F32_DOT: tl.constexpr,
    CAUSAL_BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr,
):
    req = tl.program_id(0)
    q_tile = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
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

    # This program's key range: whole tiles of BLOCK_N, one range per split.
    split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    key_begin = split * split_len
    key_end = tl.minimum(key_begin + split_len, context_len)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    for start in range(key_begin, key_end, BLOCK_N):
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
        # A row that has seen no visible key yet (block-causal, in a later key split) keeps -inf:
        # exponentiate against 0 instead, so it stays at weight 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_vn + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        # Partial [split, token, head, D] normalised over this range, and its log2-sum-exp.
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part_rows = (split * num_tokens + q_rows) * NUM_HEADS + head
        tl.store(partial_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(lse_ptr + part_rows, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(partial_ptr, lse_ptr, out_ptr, num_tokens, stride_on, stride_oh,
                         NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr):
    """out[token, head] = sum_s w_s * partial_s / sum_s w_s, w_s = exp2(lse_s - max_s lse_s)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    rows = (splits * num_tokens + token) * NUM_HEADS + head
    lse = tl.load(lse_ptr + rows)
    weight = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(partial_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=dims[None, :] < HEAD_DIM, other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_on + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


_SM_COUNTS: dict[int, int] = {}


def auto_num_splits(num_programs: int, device: torch.device) -> int:
    """Key splits for a grid of ``num_programs`` (request, query tile, kv head) programs: enough
    to give every SM about two programs, at most 8; 1 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = 2 * _SM_COUNTS[index]
    if num_programs >= wanted // 2:
        return 1
    return min(8, triton.next_power_of_2(-(-wanted // num_programs)))


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
    causal_block_size: int = 0, query_pos_start: torch.Tensor | None = None, num_splits: int | None = None,
) -> torch.Tensor:
    """Triton path. q: [N, H, D] packed by request; k_pool / v_pool: [num_slots, KVH, D];
    query_start_loc: [R + 1] int32 offsets into q; block_tables: [R, max_pages] int32 page ids;
    context_lens: [R] int32 (>= 1 for a request with queries). ``max_queries`` bounds the
    queries of one request (default: read from query_start_loc, which synchronises; pass it
    to keep the call free of host syncs, e.g. under CUDA-graph capture). Block-causal models add
    ``causal_block_size`` and ``query_pos_start`` ([R] int32, see the module). ``num_splits``:
    key ranges per (request, query tile, kv head), a power of two (default: ``auto_num_splits``).
    Returns [N, H, D]."""
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
    num_q_tiles = triton.cdiv(max_queries, block_q)
    if num_splits is None:
        num_splits = auto_num_splits(num_requests * num_q_tiles * num_kv_heads, q.device)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    num_tokens = q.shape[0]
    if num_splits > 1:
        partial = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
    else:
        partial = lse = out  # unread and unwritten
    grid = (num_requests, num_q_tiles * num_splits, num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, out, partial, lse, query_start_loc, block_tables, context_lens,
        query_pos_start if causal_block_size else context_lens,  # unread when not block-causal
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        scale * 1.4426950408889634, num_tokens,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_Q=block_q,
        BLOCK_N=block_n, PAGE_SIZE=page_size, F32_DOT=q.dtype == torch.float32 or interpreting(),
        CAUSAL_BLOCK=causal_block_size, NUM_SPLITS=num_splits, NUM_HEADS=num_heads, num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            partial, lse, out, num_tokens, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=1,
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
    """Stores the packed tokens' k, v [N, KVH, D] at their slots (before attention reads them).
    Triton path: one launch for both (k / v may be strided views, e.g. of a packed QKV output)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if (v.shape != k.shape or k_pool.shape[1:] != k.shape[1:] or v_pool.shape != k_pool.shape
            or slot_mapping.shape != (num_tokens,)):
        raise ValueError(f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, pools {tuple(k_pool.shape)}, "
                         f"slots {tuple(slot_mapping.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
        raise ValueError("the head dimension of k, v and the pools must be contiguous")
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), 4096 // block_d))
    _write_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
        k, v, k_pool, v_pool, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr, stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_kpn, stride_kph, stride_vpn, stride_vph,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    k = tl.load(k_ptr + token * stride_kn + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(k_pool_ptr + slot * stride_kpn + heads[:, None] * stride_kph + dims[None, :], k, mask=mask)
    v = tl.load(v_ptr + token * stride_vn + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(v_pool_ptr + slot * stride_vpn + heads[:, None] * stride_vph + dims[None, :], v, mask=mask)


def write_kv_reference(k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> None:
    """Pure-torch ``write_kv_``."""
    k_pool.index_copy_(0, slot_mapping, k)
    v_pool.index_copy_(0, slot_mapping, v)
