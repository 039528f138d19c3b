"""Skinny GEMM: ``y = x @ w.T`` for a few activation rows against a large ``nn.Linear`` weight.

A batch-1 decoding step multiplies M = 1 .. 128 rows by each projection weight, so the
matmul is bound by reading the weight once from device memory. The functions:

- ``skinny_linear(x, w)``: x [M, K], w [N, K] (nn.Linear layout), float32 accumulation of the
  products; returns [M, N] in x's dtype. With ``residual`` (a float32 [M, N] stream) it returns
  ``residual + x @ w.T`` in float32 instead: the residual add becomes the matmul's epilogue
  (the projection is not rounded to x's dtype before the add, unlike ``F.linear`` + ``add_``).
- ``skinny_silu_mul_linear(gate_up, w)``: the same with ``x = silu_mul(gate_up)`` formed while
  loading (gate_up [M, 2I], w [N, I]), rounded as ``kernels.fused.silu_mul`` rounds it
  (silu rounded to the input dtype, then the product rounded), so it is the down projection
  of ``fused.silu_mul``'s output without that [M, I] tensor.

``out`` names the output buffer; it may be ``residual`` itself (an in-place update of the
stream: each output element is read and then written by the same program).

Kernel: one program per (row tile of BLOCK_M, column tile of BLOCK_N of w's rows), walking K in
BLOCK_K steps (software-pipelined over ``num_stages``).

- No split-K: every output element is one program's float32 sum in a fixed order, so results
  are deterministic and need no reduce kernel or atomics; a small BLOCK_N (16 .. 64) gives
  enough programs to fill the GPU instead.
- Row tiles are the fastest grid axis, so the programs sharing a weight slab (M > BLOCK_M) run
  side by side and read it from DRAM about once.
- x's rows past M are masked (a masked load reads no memory); w's rows past N re-read the last
  valid one (the store drops those columns), so weight loads only mask along K, and not at all
  when BLOCK_K divides K.
- Tile rows are BLOCK_K contiguous elements from 16-byte aligned starts (Triton specializes
  strides divisible by 16, as every LLaDA row length is), so the loads vectorize without
  ``multiple_of`` hints: with num_stages >= 2 they become 16-byte ``cp.async.cg`` copies into
  shared memory. The loads ask for ``evict_first`` (w: read once per step) and ``evict_last``
  (x: re-read by every program), but Triton 3.6 drops cache hints from pipelined cp.async
  loads (seen in its sm_90 PTX): they only take effect at num_stages = 1.
- ``swap_ab`` computes each tile as ``w_tile @ x_tile.T`` (BLOCK_N on the MMA's M side: Hopper's
  wgmma wants 64 there, where BLOCK_M of 16 .. 32 would get mma.sync), then transposes it.

For silu_mul every program recomputes silu for its rows and all of K: (N / BLOCK_N) x M x I
silu evaluations (~40 instructions each, libdevice expf and IEEE division) against N x I
weight bytes, so fusing pays only at small M or wide BLOCK_N. Below BLOCK_M rows, silu is
computed for the next power of two of M rows only and repeated up to the MMA's rows.

Precision: bf16 / fp16 operands multiply on tensor cores with float32 accumulation; float32
operands use IEEE float32 products (not TF32). Under the interpreter every dot is float32
(see ``kernels.interpreter``). The references accumulate in float32 with torch.

The default config is a heuristic; ``scripts/sweep_skinny_gemm.py`` measures the alternatives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.fused import _round, silu_mul_reference
from kernels.interpreter import interpreting

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LAUNCH = {"enable_fp_fusion": False}  # silu's float32 ops round as fused.silu_mul's do


@dataclass(frozen=True)
class SkinnyGemmConfig:
    """Meta-parameters of one launch. Block sizes are powers of two, at least 16 (tl.dot's minimum)."""

    block_m: int = 16
    block_n: int = 32
    block_k: int = 128
    num_stages: int = 4
    num_warps: int = 4
    swap_ab: bool = False  # tile = w_tile @ x_tile.T, transposed (BLOCK_N on the MMA's M side)

    def __post_init__(self) -> None:
        for name, low, high in (("block_m", 16, 128), ("block_n", 16, 256), ("block_k", 16, 512)):
            value = getattr(self, name)
            if not (isinstance(value, int) and low <= value <= high and value & (value - 1) == 0):
                raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value!r}")
        if not (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8):
            raise ValueError(f"num_stages must be an int in [1, 8], got {self.num_stages!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")

    def smem_bytes(self, is_silu_mul: bool = False, element_size: int = 2) -> int:
        """An upper bound on the shared memory of the pipeline's operand tiles (x, up too for
        silu_mul, and w): Triton 3.6 on sm_90 keeps num_stages of them with wgmma, one fewer
        with mma.sync (checked against compiled kernels)."""
        a_tiles = 2 if is_silu_mul else 1
        return self.num_stages * (a_tiles * self.block_m + self.block_n) * self.block_k * element_size


# The default config's pipeline stays under this (an H100 / H200 block may use 227 KiB).
DEFAULT_SMEM_BYTES = 160 * 1024


def default_config(num_rows: int, n: int, k: int, device: torch.device, element_size: int = 2,
                   is_silu_mul: bool = False) -> SkinnyGemmConfig:
    """The config ``scripts/sweep_skinny_gemm.py`` found best for every LLaDA-8B projection at 32
    rows on an H200 (2026-12-04, docs/benchmarks/skinny_gemm_nvidia_h200_2026-12-04.md): 64-wide
    column tiles computed as w_tile @ x_tile.T, K in steps of 128, 4 warps; 3 pipeline stages for
    the wide (N >= 2K) projections, 5 for the square and the tall-K ones; fewer where the
    operands' shared memory would pass DEFAULT_SMEM_BYTES (float32, or 64-row tiles)."""
    block_m = min(max(16, triton.next_power_of_2(max(num_rows, 1))), 64)
    cfg = SkinnyGemmConfig(block_m=block_m, block_n=64, block_k=128, num_stages=3 if n >= 2 * k else 5,
                           num_warps=4, swap_ab=True)
    while cfg.num_stages > 1 and cfg.smem_bytes(is_silu_mul, element_size) > DEFAULT_SMEM_BYTES:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg


def _resolve_config(config, num_rows: int, n: int, k: int, device: torch.device, element_size: int,
                    is_silu_mul: bool) -> SkinnyGemmConfig:
    if isinstance(config, SkinnyGemmConfig):
        return config
    base = default_config(num_rows, n, k, device, element_size, is_silu_mul)
    if config is None:
        return base
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict or SkinnyGemmConfig, got {type(config).__name__}")
    unknown = set(config) - {f.name for f in dataclasses.fields(SkinnyGemmConfig)}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    return dataclasses.replace(base, **config)  # keys left out keep the default's values


# --- Kernel --------------------------------------------------------------------------------------


@triton.jit
def _silu_mul_tile(g, u, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """``fused.silu_mul`` on a tile: silu in float32 rounded to ``dtype``, times up, rounded."""
    g = g.to(tl.float32)
    if INTERPRETED:  # no libdevice in the interpreter
        e = tl.exp(-g)
    else:
        e = libdevice.exp(-g)  # CUDA's expf, as torch's silu kernel and fused.silu_mul
    silu = _round(tl.math.div_rn(g, 1.0 + e), dtype, INTERPRETED)
    return _round(silu.to(tl.float32) * u.to(tl.float32), dtype, INTERPRETED)


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_gemm_kernel(
    a_ptr, up_ptr, w_ptr, res_ptr, out_ptr,
    num_rows, n, k, stride_am, stride_um, stride_wn, stride_rm, stride_om,
    SILU_MUL: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, A_ROWS: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # x rows past M are masked (a masked cp.async reads nothing); w rows past N re-read the last
    # valid one instead (unmasked loads; the store drops those columns).
    a_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, A_ROWS)
    a_row_ok = (a_rows < num_rows)[:, None]
    w_rows = tl.minimum(cols, n - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    u_ptrs = up_ptr + a_rows.to(tl.int64)[:, None] * stride_um + ks[None, :]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + ks[None, :]
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            a_ok = a_row_ok
        else:
            k_ok = (k0 + ks < k)[None, :]
            w = tl.load(w_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_first")
            a_ok = a_row_ok & k_ok
        a = tl.load(a_ptrs, mask=a_ok, other=0.0, eviction_policy="evict_last")
        if SILU_MUL:
            u = tl.load(u_ptrs, mask=a_ok, other=0.0, eviction_policy="evict_last")
            a = _silu_mul_tile(a, u, a_ptr.dtype.element_ty, INTERPRETED)
        if A_ROWS < BLOCK_M:  # silu of the real rows only, repeated to the MMA's rows (extra ones dropped)
            a = tl.reshape(tl.broadcast_to(a[None, :, :], (BLOCK_M // A_ROWS, A_ROWS, BLOCK_K)), (BLOCK_M, BLOCK_K))
        if DOT_PRECISION == "ieee":  # float32 operands, or any under the interpreter (see kernels.interpreter)
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)

    mask = (rows < num_rows)[:, None] & (cols < n)[None, :]
    rows = rows.to(tl.int64)
    if HAS_RESIDUAL:  # read before the store below: out may be the residual itself
        acc = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0) + acc
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], _round(acc, out_ptr.dtype.element_ty, INTERPRETED),
             mask=mask)


# --- Host side -----------------------------------------------------------------------------------


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")


def _check_operands(a_name: str, a: torch.Tensor, w: torch.Tensor, residual, out,
                    want: torch.dtype | None = None) -> torch.dtype:
    """Validates a [M, K], w [N, K], residual / out [M, N]; returns the output dtype."""
    _check_matrix(a_name, a)
    _check_matrix("w", w)
    if a.dtype not in _FLOAT_DTYPES or w.dtype != a.dtype:
        raise ValueError(f"{a_name} and w must share one dtype of float32, bfloat16 or float16, "
                         f"got {a.dtype} and {w.dtype}")
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"{a_name} [M, K] and w [N, K] disagree on K: {tuple(a.shape)} vs {tuple(w.shape)}")
    shape = (a.shape[0], w.shape[0])
    if residual is not None:
        _check_matrix("residual", residual)
        if residual.dtype != torch.float32 or tuple(residual.shape) != shape:
            raise ValueError(f"residual must be a float32 {shape} tensor, got {residual.dtype} {tuple(residual.shape)}")
    if want is not None and want not in (a.dtype, torch.float32):
        raise ValueError(f"out_dtype must be float32 or {a_name}'s dtype ({a.dtype}), got {want}")
    if want is not None and residual is not None and want != torch.float32:
        raise ValueError("with a residual the output is float32")
    out_dtype = torch.float32 if residual is not None else (want or a.dtype)
    if out is not None:
        _check_matrix("out", out)
        if out.dtype != out_dtype or tuple(out.shape) != shape:
            raise ValueError(f"out must be a {out_dtype} {shape} tensor, got {out.dtype} {tuple(out.shape)}")
    devices = {t.device for t in (a, w, residual, out) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return out_dtype


def _launch(a, up, w, residual, out, config, out_dtype) -> torch.Tensor:
    num_rows, k = a.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty(num_rows, n, dtype=out_dtype, device=a.device)
    if num_rows == 0 or n == 0:
        return out
    cfg = _resolve_config(config, num_rows, n, k, a.device, a.element_size(), up is not None)
    has_res = residual is not None
    grid = (triton.cdiv(num_rows, cfg.block_m), triton.cdiv(n, cfg.block_n))
    # silu_mul is computed for the next power of two of M rows only, not for BLOCK_M (>= 16).
    a_rows = min(cfg.block_m, triton.next_power_of_2(num_rows)) if up is not None else cfg.block_m
    _skinny_gemm_kernel[grid](
        a, up if up is not None else a, w, residual if has_res else out, out,
        num_rows, n, k, a.stride(0), (up if up is not None else a).stride(0), w.stride(0),
        (residual if has_res else out).stride(0), out.stride(0),
        SILU_MUL=up is not None, HAS_RESIDUAL=has_res, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, A_ROWS=a_rows, EVEN_K=k % cfg.block_k == 0, SWAP_AB=cfg.swap_ab,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 or interpreting() else "tf32",  # tf32: unused by bf16 / fp16
        INTERPRETED=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH,
    )
    return out


ConfigLike = SkinnyGemmConfig | dict | None


def skinny_linear(x: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, config: ConfigLike = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ w.T`` (x [M, K], w [N, K]; float32 accumulation) in x's dtype, or, with a float32
    ``residual`` [M, N], ``residual + x @ w.T`` in float32. ``out`` ([M, N], that dtype) may be
    ``residual`` for an in-place update. ``config``: a ``SkinnyGemmConfig``, or a dict of some of
    its fields over ``default_config``. Rows of x and w may be strided; their last dimension not.
    ``out_dtype=torch.float32`` without a residual: the product unrounded, in float32."""
    out_dtype = _check_operands("x", x, w, residual, out, out_dtype)
    return _launch(x, None, w, residual, out, config, out_dtype)


def skinny_silu_mul_linear(gate_up: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None,
                           out: torch.Tensor | None = None, config: ConfigLike = None) -> torch.Tensor:
    """``skinny_linear(fused.silu_mul(gate_up), w, ...)`` without the [M, I] intermediate:
    gate_up [M, 2I] (gate the first I columns, up the last I), w [N, I]."""
    _check_matrix("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [M, 2I], got {tuple(gate_up.shape)}")
    inner = gate_up.shape[1] // 2
    gate, up = gate_up[:, :inner], gate_up[:, inner:]
    out_dtype = _check_operands("gate_up's halves", gate, w, residual, out)
    return _launch(gate, up, w, residual, out, config, out_dtype)


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``skinny_linear``: float32 products and sums, then the epilogue."""
    _check_operands("x", x, w, residual, None)
    y = F.linear(x.float(), w.float())
    return residual + y if residual is not None else y.to(x.dtype)


def skinny_silu_mul_linear_reference(gate_up: torch.Tensor, w: torch.Tensor, *,
                                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``skinny_silu_mul_linear``: ``fused.silu_mul_reference`` then the linear."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [M, 2I], got {tuple(gate_up.shape)}")
    return skinny_linear_reference(silu_mul_reference(gate_up), w, residual=residual)
