"""Building blocks shared by the model families: RMSNorm, rotary embedding, the
pre-norm SwiGLU transformer block. Module names are set by each family so that state-dict
keys match the published checkpoints exactly."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataclasses import dataclass
from typing import Callable, NamedTuple

from dilaserve.models.attention import AttentionBackend
from dilaserve.models.packing import packed


class RMSNorm(nn.Module):
    """Normalises in float32 and casts back before the scale (as LLaDA and Qwen2 do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


_ROTARY_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [N, 1, head_dim] in float32, for absolute positions [N].

    Read from a table per (device, head_dim, theta) that grows to the longest position seen,
    so a step does no trigonometry."""
    key = (positions.device, head_dim, theta)
    table = _ROTARY_TABLES.get(key)
    if table is not None and positions.is_cuda and torch.cuda.is_current_stream_capturing():
        return table[0][positions], table[1][positions]  # no host sync under graph capture
    needed = int(positions.max()) + 1 if positions.numel() else 1
    if table is None or table[0].shape[0] < needed:
        length = max(needed, 4096)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
        freqs = torch.arange(length, device=positions.device, dtype=torch.float32).unsqueeze(-1) * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        table = _ROTARY_TABLES[key] = (angles.cos(), angles.sin())
    return table[0][positions], table[1][positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation (NeoX / LLaMA layout), computed in float32."""
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)


# The fused path runs a step's MLP on at most this many tokens at a time (see _fused_block).
MLP_CHUNK_TOKENS = 2048


@dataclass(frozen=True)
class BlockOps:
    """Fused element-wise operations of a block (the GPU fast path's Triton kernels, see
    ``kernels/fused.py``), each computing what the eager code here computes:
    ``rms_norm(x, weight, eps)``, ``add_rms_norm(x, residual, weight, eps) -> (norm(x +
    residual), x + residual)``, ``rotary(q, k, cos, sin) -> (q, k)`` and ``silu_mul(gate, up)``."""

    rms_norm: Callable
    add_rms_norm: Callable
    rotary: Callable
    silu_mul: Callable
    # The residual stream's dtype (None: the embeddings'). float32 on the GPU fast path: a bf16
    # stream rounds at each of a model's 2 x layers adds, about half the bf16 logits error on
    # LLaDA-shaped random weights (scripts/bf16_error_budget.py); matmuls stay in bf16.
    residual_dtype: torch.dtype | None = None
    # Matmuls of plain bias-free projections (None: the modules' own): ``linear(x, weight)`` as
    # F.linear, and ``linear_add(x, weight, residual)``: residual += x @ weight.T in place, for
    # the o and down projections into the stream (the residual add then needs no launch).
    linear: Callable | None = None
    linear_add: Callable | None = None
    # ``linear_wide(x, weight)``: the product in float32 (unrounded), for the packed q | k | v and
    # gate | up projections; the rotary embedding / silu x up then round it once to x's dtype.
    linear_wide: Callable | None = None
    # Whether q | k | v use linear_wide (else linear: bf16 products, as every other step's).
    wide_qkv: bool = True
    # ``linear_swiglu(x, gate_up_weight, group=)``: silu x up of the packed gate | up products in
    # x's dtype, the products unrounded, in one kernel (group: the pack's row order, see
    # ``PackedProjection.interleave``); None where it leaves a step to linear_wide and silu_mul.
    linear_swiglu: Callable | None = None
    # Whether the runner interleaves gate | up packs row by row (read by ``ModelRunner``).
    interleave_gate_up: bool = False
    # A large step's MLP runs on slices of at most this many rows (its temporaries' memory).
    mlp_chunk_tokens: int = MLP_CHUNK_TOKENS
    # The steps (by rows) that use linear_add and linear_wide; larger ones round their products
    # to bf16 and add them in the next norm (None: every step). Wider products cost large,
    # compute-bound steps memory traffic.
    unrounded_max_rows: int | None = None


def residual_stream(x: torch.Tensor, ops: BlockOps | None) -> torch.Tensor:
    """The embeddings as the residual stream the blocks carry."""
    return x if ops is None or ops.residual_dtype is None else x.to(ops.residual_dtype)


def final_norm(x, norm: RMSNorm, ops: BlockOps | None) -> torch.Tensor:
    """The last norm of the stream the blocks return (a ``PendingResidual`` on the fused path)."""
    return norm(x) if ops is None else _norm_stream(x, norm, ops, norm.weight.dtype)[0]


def transformer_block(
    x: torch.Tensor | PendingResidual,
    *,
    layer_idx: int,
    attn_norm: RMSNorm,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    o_proj: nn.Linear,
    mlp_norm: RMSNorm,
    gate_proj: nn.Linear,
    up_proj: nn.Linear,
    down_proj: nn.Linear,
    rotary: tuple[torch.Tensor, torch.Tensor],
    attn: AttentionBackend,
    head_dim: int,
    q_norm: RMSNorm | None = None,
    k_norm: RMSNorm | None = None,
    ops: BlockOps | None = None,
) -> torch.Tensor | PendingResidual:
    """One pre-norm block: x + attn(norm(x)), then h + down(silu(gate(norm(h))) * up(norm(h))).

    ``q_norm`` / ``k_norm`` (Qwen3's QK-norm): RMSNorm of each head's query and key over
    head_dim, before the rotary embedding. ``ops``: fused kernels for the element-wise work
    (four launches a block instead of ~35), else the eager code below. The fused path adds the
    o and down projections into the stream in their matmuls (``ops.linear_add``) where it can,
    else it returns the stream with the MLP's output not yet added (a ``PendingResidual``) for
    the next block's norm to add."""
    if ops is not None:
        return _fused_block(x, layer_idx, attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, gate_proj,
                            up_proj, down_proj, rotary, attn, head_dim, q_norm, k_norm, ops)
    n = x.shape[0]
    h = attn_norm(x)
    q = q_proj(h).view(n, -1, head_dim)
    k = k_proj(h).view(n, -1, head_dim)
    v = v_proj(h).view(n, -1, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = rotary
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = attn(layer_idx, q, k, v)
    x = x + o_proj(a.reshape(n, -1))
    h = mlp_norm(x)
    return x + down_proj(F.silu(gate_proj(h)) * up_proj(h))


class PendingResidual(NamedTuple):
    """The fused path's residual stream between blocks: ``stream + delta`` not yet added. The
    next block's (or the final) RMSNorm adds it in its own launch (``ops.add_rms_norm``)."""

    stream: torch.Tensor
    delta: torch.Tensor


def _norm_stream(x, norm: RMSNorm, ops: BlockOps, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x), x) of the stream, adding a pending residual on the way."""
    if isinstance(x, PendingResidual):
        return ops.add_rms_norm(x.delta, x.stream, norm.weight, norm.eps, out_dtype=out_dtype)
    return ops.rms_norm(x, norm.weight, norm.eps, out_dtype=out_dtype), x


def _plain(proj: nn.Module) -> bool:
    """A bias-free nn.Linear itself (a tensor-parallel shard's forward also communicates)."""
    return type(proj) is nn.Linear and proj.bias is None


def _fused_block(x, layer_idx, attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, gate_proj, up_proj, down_proj,
                 rotary, attn, head_dim, q_norm, k_norm, ops: BlockOps) -> torch.Tensor | PendingResidual:
    act = q_proj.weight.dtype  # the stream may be wider than the matmuls' inputs
    h, x = _norm_stream(x, attn_norm, ops, act)
    n = x.shape[0]
    qkv = packed(q_proj, k_proj, v_proj)
    stores = hasattr(attn, "rotate_and_store")  # rotary and the KV-cache write in one launch
    unrounded = ops.unrounded_max_rows is None or n <= ops.unrounded_max_rows
    wide = ops.linear_wide if unrounded else None
    # float32 q, k, v only where that launch rounds them into the cache's dtype
    qkv_linear = wide if stores and wide is not None and ops.wide_qkv else ops.linear
    q, k, v = qkv(h, qkv_linear) if qkv is not None else (q_proj(h), k_proj(h), v_proj(h))
    q, k, v = q.view(n, -1, head_dim), k.view(n, -1, head_dim), v.view(n, -1, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if stores:
        a = attn.attend(layer_idx, attn.rotate_and_store(layer_idx, q, k, v, *rotary))
    else:
        q, k = ops.rotary(q, k, *rotary)
        a = attn(layer_idx, q, k, v)
    add_in_matmul = unrounded and ops.linear_add is not None and x.dtype == torch.float32
    if add_in_matmul and _plain(o_proj):  # x += o(a) in place, then the norm alone
        x = ops.linear_add(a.reshape(n, -1), o_proj.weight, x)
        h = ops.rms_norm(x, mlp_norm.weight, mlp_norm.eps, out_dtype=act)
    else:
        h, x = ops.add_rms_norm(o_proj(a.reshape(n, -1)), x, mlp_norm.weight, mlp_norm.eps, out_dtype=act)
    gate_up = packed(gate_proj, up_proj)
    add_down = add_in_matmul and _plain(down_proj)

    def mlp(rows: torch.Tensor, stream: torch.Tensor) -> torch.Tensor | PendingResidual:
        fused_mlp = gate_up is not None and gate_up.bias is None and wide is not None and ops.linear_swiglu
        # None: not for this step
        mid = ops.linear_swiglu(rows, gate_up.weight, group=gate_up.group) if fused_mlp else None
        if mid is not None:
            pass
        elif gate_up is not None and wide is not None:  # float32 gate, up; silu x up rounds once
            gate, up = gate_up(rows, wide)
            mid = ops.silu_mul(gate, up, out=torch.empty(gate.shape, dtype=act, device=gate.device))
        else:
            gate, up = gate_up(rows, ops.linear) if gate_up is not None else (gate_proj(rows), up_proj(rows))
            mid = ops.silu_mul(gate, up)
        if add_down:
            return ops.linear_add(mid, down_proj.weight, stream)
        return PendingResidual(stream, down_proj(mid))

    chunk = ops.mlp_chunk_tokens
    if n <= chunk:
        return mlp(h, x)  # x updated in place, or a pending residual the next norm adds
    # A large step (refreshes of many requests): the MLP's [tokens, 3 x intermediate] temporaries
    # are a step's largest memory; in slices of ops.mlp_chunk_tokens rows they stay bounded.
    out = x if add_down else torch.empty_like(x)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        part = mlp(h[start:end], x[start:end])
        if not add_down:
            torch.add(part.stream, part.delta, out=out[start:end])
    return out
