"""Fused elementwise ops of a transformer block: RMSNorm (with the residual add), rotary, SwiGLU.

Each Triton function computes what the eager code in ``dilaserve.models.layers`` computes, and
sits beside a pure-torch reference written the same way as that code:

- ``rms_norm(x, w, eps)``: ``w * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``;
  the normalised row is rounded to x's dtype *before* the scale (as LLaDA and Qwen2 do), the
  product is in ``promote_types(w.dtype, x.dtype)``.
- ``add_rms_norm(x, residual, w, eps)``: ``s = x + residual`` (rounded to the residual's dtype:
  torch's add for one dtype), returns ``(rms_norm(s, w, eps), s)``: the block's residual add
  fused with the next norm. The residual stream may be float32 while ``x`` (a projection's
  output) is bf16 / fp16: the stream then never rounds (see ``layers.BlockOps``). Both norms
  take ``out_dtype`` for their output (default: ``promote_types(w.dtype, stream dtype)``).
- ``rotary(q, k, cos, sin[, positions])``: the half-split (NeoX / LLaMA) rotation of every query
  and key head, in float32, rounded back to the input dtype; q and k in one launch. ``cos`` /
  ``sin`` are per-token rows, or whole tables indexed by ``positions`` inside the kernel.
  ``rotary_store_kv`` also writes the rotated k and v to their KV-cache slots in that launch.
- ``silu_mul(gate_up)`` / ``silu_mul(gate, up)``: ``F.silu(gate) * up`` in the input dtype (silu
  rounded to that dtype before the product, as the two eager kernels do).

Layouts: the last dimension of every tensor must be contiguous (stride 1); the other dimensions
may be strided (e.g. q / k / v as views of one fused QKV projection), which is checked with a
clear ``ValueError``. No host syncs and no branching on tensor values, so every call can be
captured in a CUDA graph (after one warm-up call has compiled it). Float32, bfloat16, float16.

Numerics against the eager torch code: rotary, the residual sum and silu_mul do the same
float32 operations in the same order (no FMA contraction: ``enable_fp_fusion=False``; IEEE
division; silu's exp is CUDA's expf through libdevice, as torch's kernel), so they match the
eager CUDA ops bit for bit (on CPU, silu's exp may differ from torch's in the last bit).
RMSNorm sums the squares in another order (and takes 1/sqrt where CUDA torch uses rsqrtf):
float32 outputs agree to ~1e-7 relative; a bf16 output can then differ by one bf16 ulp where
the float32 value lies on a rounding edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.interpreter import interpreting

# The widest row a norm program holds in registers; wider rows are streamed in chunks (twice).
MAX_NORM_BLOCK = 8192
_LAUNCH = {"enable_fp_fusion": False}  # a * b + c stays two roundings, as in the eager kernels


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")


def _check_float(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype must be float32, bfloat16 or float16, got {t.dtype}")


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x rounded to ``dtype``. Triton 3.6's interpreter truncates float32 -> bfloat16,
    so there it is rounded to nearest even by hand first (then the truncation is exact)."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# --- RMSNorm and residual add + RMSNorm ----------------------------------------------------------


@triton.jit
def _load_row_chunk(x_ptr, res_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_s,
                    HAS_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr):
    """The input row chunk in float32: x, or x + residual rounded to the stream's dtype (and stored)."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = _round(x.to(tl.float32) + r.to(tl.float32), sum_ptr.dtype.element_ty, INTERPRETED)
        tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _scale_row_chunk(x, rstd, w_ptr, out_ptr, rows, cols, mask, dim, stride_o, x_dtype: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0)
    h = _round(x * rstd[:, None], x_dtype, INTERPRETED).to(tl.float32)  # rounded before the scale
    out = w.to(tl.float32)[None, :] * h
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], _round(out, out_ptr.dtype.element_ty, INTERPRETED),
             mask=mask)


@triton.jit(do_not_specialize=["num_rows", "dim_f", "eps"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    num_rows, dim, dim_f, stride_x, stride_r, stride_o, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    if HAS_RESIDUAL:  # the normalised row is rounded to the residual stream's dtype
        x_dtype = sum_ptr.dtype.element_ty
    else:
        x_dtype = x_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:  # the whole row stays in registers
        cols = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        x = _load_row_chunk(x_ptr, res_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_s,
                            HAS_RESIDUAL, INTERPRETED)
        mean_sq = tl.math.div_rn(tl.sum(x * x, 1), dim_f)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_sq + eps))
        _scale_row_chunk(x, rstd, w_ptr, out_ptr, rows, cols, mask, dim, stride_o, x_dtype, INTERPRETED)
    else:  # stream the row twice (the second time from L2)
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < dim)[None, :]
            x = _load_row_chunk(x_ptr, res_ptr, sum_ptr, rows, cols, mask, stride_x, stride_r, stride_s,
                                HAS_RESIDUAL, INTERPRETED)
            sum_sq += tl.sum(x * x, 1)
        mean_sq = tl.math.div_rn(sum_sq, dim_f)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_sq + eps))
        tl.debug_barrier()  # the sums this program stored are visible to all its threads
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < dim)[None, :]
            if HAS_RESIDUAL:  # the stored sum (x or residual may have been overwritten by it)
                x = tl.load(sum_ptr + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
            else:
                x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            _scale_row_chunk(x, rstd, w_ptr, out_ptr, rows, cols, mask, dim, stride_o, x_dtype, INTERPRETED)


def _norm_launch(x, residual, weight, eps, out, residual_out, out_dtype=None):
    if x.dim() != 2 or weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"x must be [N, D] and weight [D], got {tuple(x.shape)} and {tuple(weight.shape)}")
    _check_float(x=x, weight=weight)
    _check_last_dim_contiguous(x=x, weight=weight)
    stream_dtype = x.dtype
    if residual is not None:
        if residual.shape != x.shape or (residual.dtype != x.dtype and residual.dtype != torch.float32):
            raise ValueError(f"residual must match x, or be a float32 stream: {tuple(residual.shape)} "
                             f"{residual.dtype} vs {tuple(x.shape)} {x.dtype}")
        _check_last_dim_contiguous(residual=residual)
        stream_dtype = residual.dtype
    num_rows, dim = x.shape
    if out is None:
        dtype = out_dtype or torch.promote_types(weight.dtype, stream_dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(residual)
    if residual_out is not None and residual_out.dtype != stream_dtype:
        raise ValueError(f"residual_out must be {stream_dtype}, got {residual_out.dtype}")
    written = {"out": out, **({"residual_out": residual_out} if residual is not None else {})}
    for name, t in written.items():
        if t.shape != x.shape:
            raise ValueError(f"{name} must be {tuple(x.shape)}, got {tuple(t.shape)}")
    _check_last_dim_contiguous(**written)
    if num_rows == 0:
        return out, residual_out
    block_d = min(triton.next_power_of_2(dim), MAX_NORM_BLOCK)
    num_chunks = triton.cdiv(dim, block_d)
    # Small rows (QK-norm over head_dim): several rows per program, ~4K elements a tile.
    block_m = max(1, min(4096 // block_d, triton.next_power_of_2(num_rows), 64))
    num_warps = min(16, max(4, block_m * block_d // 512))
    has_res = residual is not None
    sums = residual_out if has_res else out  # unread / unwritten without a residual
    _rms_norm_kernel[(triton.cdiv(num_rows, block_m),)](
        x, residual if has_res else x, weight, out, sums,
        num_rows, dim, float(dim), x.stride(0), (residual if has_res else x).stride(0), out.stride(0),
        sums.stride(0), eps,
        HAS_RESIDUAL=has_res, BLOCK_M=block_m, BLOCK_D=block_d, NUM_CHUNKS=num_chunks, INTERPRETED=interpreting(),
        num_warps=num_warps, **_LAUNCH,
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm of each row of x [N, D] (any D), as ``RMSNorm.forward``. Returns [N, D] in
    ``out_dtype`` (default ``promote_types(weight.dtype, x.dtype)``), or writes ``out``. For a
    per-head norm (QK-norm) pass ``q.view(-1, head_dim)``."""
    return _norm_launch(x, None, weight, eps, out, None, out_dtype)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` ([N, D]; residual of x's dtype or a float32 stream) and its RMSNorm,
    in one pass. Returns ``(rms_norm(s, weight, eps), s)``, ``s`` in the residual's dtype.
    ``residual_out`` may be ``residual`` (or ``x``, of the same dtype) itself, to update the
    residual stream in place (a row's program reads each element before it writes it, and
    reads the stored sum back for rows wider than ``MAX_NORM_BLOCK``)."""
    return _norm_launch(x, residual, weight, eps, out, residual_out, out_dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch ``rms_norm``, written as ``RMSNorm.forward``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if out_dtype is None else out.to(out_dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ``add_rms_norm``."""
    s = (x.float() + residual.float()).to(residual.dtype) if x.dtype != residual.dtype else x + residual
    return rms_norm_reference(s, weight, eps, out_dtype), s


# --- Rotary embedding ----------------------------------------------------------------------------


@triton.jit
def _rotate_heads(x_ptr, out_ptr, rows, out_rows, token_ok, head0, num_heads, stride_xn, stride_xh, stride_on,
                  stride_oh, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  INTERPRETED: tl.constexpr):
    """Rotates a [BLOCK_T tokens, BLOCK_H heads, head_dim] tile read at ``rows`` of x and written
    at ``out_rows`` of out (a token's row, or its KV-cache slot); c1 .. s2: [BLOCK_T, 1, BLOCK_HALF]."""
    heads = (head0 + tl.arange(0, BLOCK_H))[None, :, None]
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = token_ok & (heads < num_heads) & (dims < HALF)
    src = x_ptr + rows * stride_xn + heads.to(tl.int64) * stride_xh + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # h * cos + cat(-x2, x1) * sin, elementwise in the reference's order
    y1 = x1 * c1 + (-x2) * s1
    y2 = x2 * c2 + x1 * s2
    dst = out_ptr + out_rows * stride_on + heads.to(tl.int64) * stride_oh + dims
    tl.store(dst, _round(y1, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    tl.store(dst + HALF, _round(y2, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, v_ptr, v_out_ptr, slot_ptr,
    num_tokens, num_q_heads, num_k_heads, stride_qn, stride_qh, stride_kn, stride_kh,
    stride_qon, stride_qoh, stride_kon, stride_koh, stride_cos, stride_sin, stride_pos,
    stride_vn, stride_vh, stride_von, stride_voh,
    HAS_POSITIONS: tl.constexpr, STORE_KV: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    tokens = tokens.to(tl.int64)
    head_block = tl.program_id(1)
    if HAS_POSITIONS:
        rows = tl.load(pos_ptr + tokens * stride_pos, mask=token_ok, other=0).to(tl.int64)
    else:
        rows = tokens
    rows = rows[:, None, None]
    tokens = tokens[:, None, None]
    token_ok = token_ok[:, None, None]
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    table_ok = token_ok & (dims < HALF)
    c1 = tl.load(cos_ptr + rows * stride_cos + dims, mask=table_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + rows * stride_cos + HALF + dims, mask=table_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + rows * stride_sin + dims, mask=table_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + rows * stride_sin + HALF + dims, mask=table_ok, other=0.0).to(tl.float32)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if head_block < num_q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, tokens, tokens, token_ok, head_block * BLOCK_H, num_q_heads, stride_qn,
                      stride_qh, stride_qon, stride_qoh, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_HALF, INTERPRETED)
    else:
        head0 = (head_block - num_q_blocks) * BLOCK_H
        if STORE_KV:  # k and v go straight to their KV-cache slots (k rotated, v as is)
            out_rows = tl.load(slot_ptr + tokens, mask=token_ok, other=0).to(tl.int64)
        else:
            out_rows = tokens
        _rotate_heads(k_ptr, k_out_ptr, tokens, out_rows, token_ok, head0, num_k_heads, stride_kn, stride_kh,
                      stride_kon, stride_koh, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_HALF, INTERPRETED)
        if STORE_KV:
            heads = (head0 + tl.arange(0, BLOCK_H))[None, :, None].to(tl.int64)
            full = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
            mask = token_ok & (heads < num_k_heads) & (full < 2 * HALF)
            v = tl.load(v_ptr + tokens * stride_vn + heads * stride_vh + full, mask=mask).to(tl.float32)
            tl.store(v_out_ptr + out_rows * stride_von + heads * stride_voh + full,
                     _round(v, v_out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def _as_rows(table: torch.Tensor, head_dim: int, name: str) -> torch.Tensor:
    """cos / sin as [rows, head_dim]: accepts [rows, 1, head_dim] (as rotary_cos_sin gives) or 2-D."""
    if table.dim() == 3 and table.shape[1] == 1:
        table = table[:, 0]
    if table.dim() != 2 or table.shape[1] != head_dim:
        raise ValueError(f"{name} must be [rows, 1, {head_dim}] or [rows, {head_dim}], got {tuple(table.shape)}")
    _check_last_dim_contiguous(**{name: table})
    return table


def _rotary_launch(q, k, cos, sin, positions, q_out, k_out, store=None):
    """``store``: (v, k_pool, v_pool, slot_mapping) to write rotated k and v at their KV-cache
    slots (k_out is then k_pool)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [N, H, Dh] and k [N, KVH, Dh], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for the half-split rotation, got {head_dim}")
    _check_float(q=q, k=k)
    _check_last_dim_contiguous(q=q, k=k, q_out=q_out, k_out=k_out)
    cos, sin = _as_rows(cos, head_dim, "cos"), _as_rows(sin, head_dim, "sin")
    if positions is None:
        if cos.shape[0] != num_tokens or sin.shape[0] != num_tokens:
            raise ValueError(f"without positions, cos / sin need one row per token ({num_tokens}), "
                             f"got {cos.shape[0]} / {sin.shape[0]}")
    elif positions.dim() != 1 or positions.shape[0] != num_tokens or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [N] int32/int64 with N = {num_tokens}, got {tuple(positions.shape)} "
                         f"{positions.dtype}")
    v, v_out, slots = (k, k_out, cos) if store is None else (store[0], store[2], store[3])
    if store is not None:
        if (v.shape != k.shape or k_out.dim() != 3 or k_out.shape[1:] != k.shape[1:] or v_out.shape != k_out.shape
                or slots.shape != (num_tokens,)):
            raise ValueError(f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, pools {tuple(k_out.shape)} / "
                             f"{tuple(v_out.shape)}, slots {tuple(slots.shape)}")
        if v.dtype != k.dtype or v_out.dtype != k_out.dtype or not k_out.dtype.is_floating_point:
            raise ValueError(f"k and v must share a dtype, and so must the pools, got {k.dtype}, {v.dtype} and "
                             f"{k_out.dtype}, {v_out.dtype}")
        _check_last_dim_contiguous(v=v, v_pool=v_out)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # A program rotates a tile of tokens x heads of q or of k, ~2K elements per half.
    block_h = max(1, min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), 2048 // block_half))
    block_t = max(1, min(triton.next_power_of_2(num_tokens), 2048 // (block_h * block_half)))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin, positions if positions is not None else cos, v, v_out, slots,
        num_tokens, num_q_heads, num_k_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0),
        positions.stride(0) if positions is not None else 0, v.stride(0), v.stride(1), v_out.stride(0),
        v_out.stride(1),
        HAS_POSITIONS=positions is not None, STORE_KV=store is not None, HALF=half, BLOCK_T=block_t,
        BLOCK_H=block_h, BLOCK_HALF=block_half, INTERPRETED=interpreting(), num_warps=4, **_LAUNCH,
    )
    return q_out, k_out


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [N, H, Dh] and k [N, KVH, Dh] in one launch, as ``apply_rotary`` on
    each. cos / sin: [N, 1, Dh] per-token rows (what ``rotary_cos_sin`` returns), or, with
    ``positions`` [N] (int32/int64), whole tables [max_pos, 1, Dh] read at those rows (not
    bounds-checked: that would sync; the caller keeps positions below max_pos). Returns new
    (q_rot, k_rot) in q's and k's dtypes."""
    return _rotary_launch(q, k, cos, sin, positions, torch.empty_like(q), torch.empty_like(k))


def rotary_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place ``rotary``: overwrites q and k (each element is read before it is written, by
    the same program) and returns them."""
    return _rotary_launch(q, k, cos, sin, positions, q, k)


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rotary`` fused with the KV-cache write (``paged_attention.write_kv_``): one launch
    rotates q into a new tensor, which it returns, and stores rotated k and v [N, KVH, Dh] in
    the pools [slots, KVH, Dh] at ``slot_mapping`` [N] (int64; slots not bounds-checked, as there).
    q, k, v may be wider than the pools (float32 products): the rotation is computed in float32
    and rounded once, to the pools' dtype, which the returned q also has."""
    q_out = torch.empty(q.shape, dtype=k_pool.dtype, device=q.device)
    _rotary_launch(q, k, cos, sin, positions, q_out, k_pool, store=(v, k_pool, v_pool, slot_mapping))
    return q_out


def rotary_store_kv_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch ``rotary_store_kv``."""
    q, k = rotary_reference(q, k, cos, sin, positions)
    k_pool.index_copy_(0, slot_mapping, k.to(k_pool.dtype))
    v_pool.index_copy_(0, slot_mapping, v.to(v_pool.dtype))
    return q.to(k_pool.dtype)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ``rotary``, written as ``apply_rotary`` (cos / sin as [rows, 1, Dh])."""
    if positions is not None:
        cos, sin = cos[positions], sin[positions]

    def apply(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        x1, x2 = h.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (h * cos + rotated * sin).to(x.dtype)

    return apply(q), apply(k)


# --- SwiGLU --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_rows", "num_cols"])
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, num_rows, num_cols, stride_g, stride_u, stride_o, col_g, col_u,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < num_rows) & (cols < num_cols)
    # col_g / col_u: 1 for contiguous rows (Triton specializes it), 2 for an interleaved product
    g = tl.load(gate_ptr + rows * stride_g + cols * col_g, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_u + cols * col_u, mask=mask, other=0.0).to(tl.float32)
    if INTERPRETED:  # no libdevice in the interpreter (numpy's exp, as torch's CPU kernel)
        e = tl.exp(-g)
    else:
        e = libdevice.exp(-g)  # CUDA's expf, as torch's silu kernel calls (tl.exp is ex2.approx)
    silu = _round(tl.math.div_rn(g, 1.0 + e), gate_ptr.dtype.element_ty, INTERPRETED)  # F.silu, rounded
    out = silu.to(tl.float32) * u
    tl.store(out_ptr + rows * stride_o + cols, _round(out, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@dataclass(frozen=True)
class SiluMulTile:
    """A ``silu_mul`` program's tile: ``rows`` x ``cols`` elements (powers of two), ``warps`` warps."""

    rows: int
    cols: int
    warps: int


def one_row_tile(num_rows: int, num_cols: int) -> SiluMulTile:
    """A program per row and 1024 columns (the only tile before 2026-12-06)."""
    return SiluMulTile(1, min(triton.next_power_of_2(num_cols), 1024), 4)


def silu_mul_tile(num_rows: int, num_cols: int) -> SiluMulTile:
    """The tile ``silu_mul`` launches with by default: one row of up to 1024 columns per program
    for the few rows of a small step; 4 x 512 tiles of 4 warps for a large step's thousands of
    rows. On an H100 (``scripts/sweep_silu_mul.py``, 2026-12-06) a float32 gate | up slice of
    2048 x 2 x 12288 (the fast path's large-step MLP slice) took 126 us in 4 x 512 tiles against
    168 us one row per program (69% vs 52% of the copy bandwidth); bf16 rows 102 vs 170 us."""
    if num_rows <= 64:
        return one_row_tile(num_rows, num_cols)
    return SiluMulTile(4, min(triton.next_power_of_2(num_cols), 512), 4)


def silu_mul(gate: torch.Tensor, up: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
             tile: SiluMulTile | Callable[[int, int], SiluMulTile] | None = None) -> torch.Tensor:
    """SwiGLU's ``F.silu(gate) * up`` for [N, I] rows. ``silu_mul(gate_up)`` takes one [N, 2I]
    tensor (gate the first half of each row, up the second, as a fused gate/up projection
    gives); ``silu_mul(gate, up)`` two [N, I] tensors of one dtype (any strides: the columns of an
    interleaved gate | up product are views of stride 2). Returns [N, I] in that dtype,
    or in ``out``'s (silu is rounded to gate's dtype, the product to out's). ``tile``: the
    programs' tile, or a function of (rows, columns) that picks one (default ``silu_mul_tile``);
    every tile computes the same bits."""
    if up is None:
        if gate.dim() != 2 or gate.shape[1] % 2:
            raise ValueError(f"gate_up must be [N, 2I], got {tuple(gate.shape)}")
        gate, up = gate.chunk(2, dim=1)
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must be [N, I] of one dtype, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    _check_float(gate=gate)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    if out.shape != gate.shape:
        raise ValueError(f"out must be {tuple(gate.shape)}, got {tuple(out.shape)}")
    _check_last_dim_contiguous(out=out)
    num_rows, num_cols = gate.shape
    if num_rows == 0 or num_cols == 0:
        return out
    tile = silu_mul_tile if tile is None else tile
    tile = tile if isinstance(tile, SiluMulTile) else tile(num_rows, num_cols)
    _silu_mul_kernel[(triton.cdiv(num_rows, tile.rows), triton.cdiv(num_cols, tile.cols))](
        gate, up, out, num_rows, num_cols, gate.stride(0), up.stride(0), out.stride(0), gate.stride(1),
        up.stride(1), BLOCK_M=tile.rows,
        BLOCK_N=tile.cols, INTERPRETED=interpreting(), num_warps=tile.warps, **_LAUNCH,
    )
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``silu_mul`` (same arguments), written as ``transformer_block``'s MLP."""
    if up is None:
        gate, up = gate.chunk(2, dim=1)
    return F.silu(gate) * up
