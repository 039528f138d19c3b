"""SwiGLU GEMM: ``silu(x @ w_gate.T) * (x @ w_up.T)`` in one kernel, for large steps.

A refresh-heavy step multiplies thousands of rows by the packed gate | up weight ([2I, K]).
Done as a cuBLAS matmul with a float32 output (the products unrounded, ``dilaserve/engine/gpu/
matmul.py``) followed by ``fused.silu_mul``, it writes a [M, 2I] float32 tensor and reads it back:
at 5,888 rows and I = 12,288 that is 0.58 GB each way per layer. Here each program keeps the
gate and the up tile of the same columns in two float32 accumulators and writes only
``silu(gate) * up``, rounded once to x's dtype, as ``fused.silu_mul`` rounds its float32 inputs
(silu in float32 with CUDA's expf and an IEEE division, the product rounded to the output dtype).

- ``swiglu_linear(x, w_gate_up)``: x [M, K], w_gate_up [2I, K] (gate rows first, as
  ``dilaserve.models.packing`` packs them) -> [M, I] in x's dtype.
- ``swiglu_linear_reference``: the same in torch (float32 products, then the same rounding).

Kernel: one program per (BLOCK_M rows, BLOCK_N columns of the output); the program ids walk
GROUP_M row tiles per column tile first, so neighbouring programs share weight tiles in L2.
Each K step loads one x tile and two weight tiles (gate rows n.., up rows I + n..) and issues two
dots. Rows past M and columns past I are masked; K is masked only when BLOCK_K does not divide it.

``SwigluGemmConfig(tma=True)``: the tiles come through tensor descriptors (TMA on Hopper; edges
padded and clipped by the hardware), optionally from one persistent program per SM, and the
weight may be interleaved (``interleave_gate_up``: gate row j, then up row j) so one
[BLOCK_M, 2 BLOCK_N] dot a K step replaces the two, split in the epilogue. On an H200
(``scripts/sweep_large_gemms.py``, 2026-12-06) that form ran at 626-633 TFLOP/s at 2048-5888
rows, 7-9% less time than cuBLAS's float32 product + ``fused.silu_mul``; the pointer form ran at 479-522.

Precision: bf16 / fp16 operands on tensor cores with float32 accumulation, float32 operands in
IEEE float32 (not TF32); under the interpreter the dots run in float32 (``kernels.interpreter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.fused import _round
from kernels.interpreter import interpreting

_LAUNCH = {"enable_fp_fusion": False}  # silu x up rounds as fused.silu_mul does


@dataclass(frozen=True)
class SwigluGemmConfig:
    block_m: int = 128
    block_n: int = 128  # output columns per program (it reads 2 x block_n weight rows)
    block_k: int = 64
    group_m: int = 8
    num_stages: int = 3
    num_warps: int = 8
    # Operand tiles through tensor descriptors (TMA on Hopper) instead of pointer loads; needs
    # 16-byte aligned rows (else the pointer kernel serves)
    tma: bool = False
    # With tma: one program per SM walking the tiles (else one program per tile)
    persistent: bool = False

    def __post_init__(self) -> None:
        for name, low, high in (("block_m", 16, 256), ("block_n", 16, 256), ("block_k", 16, 256)):
            value = getattr(self, name)
            if value < low or value > high or value & (value - 1):
                raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")
        if self.group_m < 1 or self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"bad group_m / num_stages / num_warps in {self}")


DEFAULT_CONFIG = SwigluGemmConfig()


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a linear tile index, walking GROUP_M row tiles per column tile
    first so that neighbouring programs share weight tiles in L2."""
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * num_n)) % group_size, (tile % (GROUP_M * num_n)) // group_size


@triton.jit
def _silu_times(acc_g, acc_u, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """The epilogue: silu(gate) x up from the float32 products, rounded once to ``dtype``."""
    if INTERPRETED:  # no libdevice in the interpreter
        e = tl.exp(-acc_g)
    else:
        e = libdevice.exp(-acc_g)  # CUDA's expf, as fused.silu_mul
    silu = tl.math.div_rn(acc_g, 1.0 + e)
    return _round(silu * acc_u, dtype, INTERPRETED)


@triton.jit
def _swiglu_gemm_kernel(x_ptr, w_ptr, out_ptr, M, I, K, stride_xm, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(I, BLOCK_N), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Rows past M / columns past I re-read the last valid one (the store drops them), so only
    # K needs a load mask, and none when BLOCK_K divides K.
    x_rows = tl.minimum(rows, M - 1).to(tl.int64)
    w_cols = tl.minimum(cols, I - 1).to(tl.int64)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + ks[None, :]
    g_ptrs = w_ptr + w_cols[:, None] * stride_wn + ks[None, :]
    u_ptrs = w_ptr + (w_cols + I)[:, None] * stride_wn + ks[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = (k0 + ks) < K
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0)
        if INTERPRETED:  # the interpreter's bf16 dots are wrong: multiply in float32 there
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, tl.trans(g), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, tl.trans(u), acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    out = _silu_times(acc_g, acc_u, out_ptr.dtype.element_ty, INTERPRETED)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out, mask=mask)


# --- tensor-descriptor (TMA) form ------------------------------------------------------------------
#
# The weight may come in one of three row orders (``interleave_gate_up``): ``group`` 0, gate rows
# then up rows (two [BLOCK_N, BLOCK_K] tiles and two dots a step); 1, gate j and up j adjacent;
# BLOCK_N, tiles of BLOCK_N gate rows then BLOCK_N up rows. Interleaved, one [2 BLOCK_N, BLOCK_K]
# tile and one dot a step give a [BLOCK_M, 2 BLOCK_N] accumulator that is split in the epilogue.


@triton.jit
def _swiglu_tma_tile(x_desc, w_desc, out_desc, tile, num_m, I, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tile, num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    if GROUP == 0:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            a = x_desc.load([row0, k0])
            g = w_desc.load([col0, k0])
            u = w_desc.load([I + col0, k0])
            if INTERPRETED:
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(a, tl.trans(g), acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, tl.trans(u), acc_u, input_precision=DOT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            a = x_desc.load([row0, k0])
            w = w_desc.load([2 * col0, k0])
            if INTERPRETED:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if GROUP == 1:
            acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        else:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    out_desc.store([row0, col0], _silu_times(acc_g, acc_u, out_desc.dtype, INTERPRETED))


@triton.jit
def _swiglu_tma_kernel(M, I, K: tl.constexpr, x_desc, w_desc, out_desc, NUM_PROGRAMS,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, GROUP: tl.constexpr, PERSISTENT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    if PERSISTENT:
        num_tiles = num_m * tl.cdiv(I, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
            _swiglu_tma_tile(x_desc, w_desc, out_desc, tile, num_m, I, K, BLOCK_M, BLOCK_N, BLOCK_K,
                             GROUP_M, GROUP, DOT_PRECISION, INTERPRETED)
    else:
        _swiglu_tma_tile(x_desc, w_desc, out_desc, tl.program_id(0), num_m, I, K, BLOCK_M, BLOCK_N,
                         BLOCK_K, GROUP_M, GROUP, DOT_PRECISION, INTERPRETED)


def interleave_gate_up(w_gate_up: torch.Tensor, group: int) -> torch.Tensor:
    """The packed gate | up weight ([2I, K], gate rows first) reordered for ``swiglu_linear(...,
    group=group)``: 1, gate row j then up row j; g > 1, g gate rows then the same g up rows
    (I must be a multiple of g); 0, unchanged."""
    if group == 0:
        return w_gate_up
    inter = w_gate_up.shape[0] // 2
    if group < 0 or inter % group:
        raise ValueError(f"group must be 0 or divide I = {inter}, got {group}")
    gate, up = w_gate_up[:inter], w_gate_up[inter:]
    k = w_gate_up.shape[1]
    return torch.stack((gate.reshape(-1, group, k), up.reshape(-1, group, k)), dim=1).reshape(2 * inter, k)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors serve these tensors: 16-byte aligned bases and row strides, on
    a Hopper or newer GPU (TMA; compute capability 9) or in the interpreter."""
    if tensors and tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def swiglu_linear(x: torch.Tensor, w_gate_up: torch.Tensor, *, out: torch.Tensor | None = None,
                  config: SwigluGemmConfig | None = None, group: int = 0) -> torch.Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)`` for x [M, K] and w_gate_up [2I, K] (gate rows
    first, or reordered by ``interleave_gate_up(w, group)``: then pass the same ``group``, which
    needs ``config.tma`` and, above 1, ``group == config.block_n``); returns [M, I] in x's dtype
    (or writes ``out``)."""
    if x.dim() != 2 or w_gate_up.dim() != 2 or x.shape[1] != w_gate_up.shape[1] or w_gate_up.shape[0] % 2:
        raise ValueError(f"need x [M, K] and w_gate_up [2I, K], got {tuple(x.shape)} and {tuple(w_gate_up.shape)}")
    if x.dtype != w_gate_up.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x and w_gate_up must share a float dtype, got {x.dtype} and {w_gate_up.dtype}")
    if x.stride(1) != 1 or w_gate_up.stride(1) != 1:
        raise ValueError("x and w_gate_up need contiguous rows")
    cfg = config or DEFAULT_CONFIG
    (m, k), inter = x.shape, w_gate_up.shape[0] // 2
    if out is None:
        out = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    elif out.shape != (m, inter) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {inter}] with contiguous rows, got {tuple(out.shape)}")
    if m == 0 or inter == 0:
        return out
    if k == 0:
        return out.zero_()
    if group and (not cfg.tma or (group > 1 and group != cfg.block_n)):
        raise ValueError(f"an interleaved weight (group {group}) needs a tma config with block_n = group "
                         f"(or group 1), got {cfg}")
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(inter, cfg.block_n)
    dot_precision = "ieee" if x.dtype == torch.float32 or interpreting() else "tf32"
    use_tma = cfg.tma and tma_ok(x, w_gate_up, out)
    if group and not use_tma:
        raise ValueError("tensor descriptors need 16-byte aligned rows and a GPU with TMA (compute "
                         "capability 9 or newer); an interleaved weight cannot be read without them")
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_rows = cfg.block_n if group == 0 else 2 * cfg.block_n
        # persistent: one program per SM (under the interpreter, 3: each walks several tiles)
        programs = min(tiles, _num_sms(x.device) if x.is_cuda else 3) if cfg.persistent else tiles
        _swiglu_tma_kernel[(programs,)](
            m, inter, k,
            TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(w_gate_up, [w_rows, cfg.block_k]),
            TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n]),
            programs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            GROUP=group, PERSISTENT=cfg.persistent, DOT_PRECISION=dot_precision, INTERPRETED=interpreting(),
            num_stages=cfg.num_stages, num_warps=cfg.num_warps, **_LAUNCH,
        )
        return out
    grid = (tiles,)
    _swiglu_gemm_kernel[grid](
        x, w_gate_up, out, m, inter, k, x.stride(0), w_gate_up.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0, INTERPRETED=interpreting(),
        # float32 operands: IEEE products (Triton's default would round them to TF32 on a GPU)
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or interpreting() else "tf32",
        num_stages=cfg.num_stages, num_warps=cfg.num_warps, **_LAUNCH,
    )
    return out


def swiglu_linear_reference(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """Pure-torch ``swiglu_linear``: float32 products, silu x up in float32, rounded once."""
    gate, up = F.linear(x.float(), w_gate_up.float()).chunk(2, dim=1)
    return (F.silu(gate) * up).to(x.dtype)
