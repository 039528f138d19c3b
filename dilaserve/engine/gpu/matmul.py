"""The fast path's matmuls: a Triton skinny GEMM for small steps, cuBLAS for the rest.

A batch-1 reuse step multiplies 32 rows by every weight of the model: the matmuls read weights
and nothing else matters. There the Triton kernel of ``kernels/skinny_gemm.py`` beat cuBLAS on
each LLaDA-8B projection on an H200 (by 4-12%, and cuBLAS adds a split-K reduce launch to the
o and down projections), and it adds the o and down projections into the float32 residual
stream in its epilogue, unrounded: one rounding less per block than a bf16 product added later
(``scripts/sweep_skinny_gemm.py``, docs/benchmarks/skinny_gemm_nvidia_h200_2026-12-04.md).
Above ``SKINNY_MAX_ROWS`` rows (the sweep measured 32) cuBLAS serves.

Products that feed an element-wise op (q | k | v, gate | up) come out in float32
(``linear_wide``), so they are rounded to bf16 once, after the rotary embedding / silu x up,
not twice: with the unrounded o / down adds this more than halves what bf16 matmul outputs
add to the logits error (``scripts/bf16_error_budget.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kernels.interpreter import interpreting
from kernels.skinny_gemm import skinny_linear
from kernels.swiglu_gemm import SwigluGemmConfig

SKINNY_MAX_ROWS = 32
# BlockOps.unrounded_max_rows of the fast path: the steps whose products are added / rounded
# unrounded (None: all). On an H200 (2026-12-04, LLaDA-8B shape, random weights) all steps
# unrounded gave logits errors of 7.5e-3 after a refresh and 7.4e-3 in a reuse step; only
# steps of <= 32 rows, 1.09e-2 and 7.7e-3, with the saturated 8192-token forward ~4% faster
# (its float32 products and adds cost memory traffic). Correct first: all steps.
UNROUNDED_MAX_ROWS: int | None = None


@dataclass(frozen=True)
class LargeStepOptions:
    """How the fast path runs its products above ``SKINNY_MAX_ROWS`` rows (where cuBLAS serves);
    read when ``fast_block_ops`` builds the block ops. ``scripts/profile_engine_steps.py
    --variants`` and ``scripts/check_gpu_numerics.py --variant`` compare them on a GPU."""

    float32_qkv: bool = True  # q | k | v products in float32, rounded once by the rotary launch
    # gate | up and silu x up in one kernel (kernels/swiglu_gemm.py), else a float32-output
    # cuBLAS matmul and fused.silu_mul. The default since the H100 run of 2026-12-06
    # (docs/benchmarks/h100_2026-12-06_swiglu_il/): with the interleaved packs, tensor
    # descriptors and 8192-row MLP slices below, c=64 end to end 1681 against 1611 tok/s
    swiglu_kernel: bool = True
    # its tiles (None: kernels.swiglu_gemm.DEFAULT_CONFIG, pointer loads)
    swiglu_config: SwigluGemmConfig | None = SwigluGemmConfig(tma=True, persistent=True)
    # gate | up packs interleaved row by row, so the kernel runs one dot per K step (needs a tma
    # config; small steps then read the product's stride-2 columns)
    interleave_gate_up: bool = True
    # rows per MLP slice of a large step (None: layers.MLP_CHUNK_TOKENS, 2048); the one-kernel
    # MLP holds no float32 [rows, 2I] products, so its slices can be larger
    mlp_chunk_tokens: int | None = 8192
    # o / down added into the float32 stream by cuBLAS itself (addmm, beta = 1), else a
    # float32-output matmul and an add. The default since the H100 run of 2026-12-05
    # (docs/benchmarks/large_steps_h100_2026-12-05/): the same sums (max difference 0.0),
    # o 20% and down 9% faster at 5,888 rows, c=64 end to end +1.5%.
    add_in_gemm: bool = True
    # silu_mul programs of several rows each on large steps (fused.silu_mul_tile), else one row
    # per program (the only tile before 2026-12-06)
    silu_row_tiles: bool = True


OPTIONS = LargeStepOptions()
# gate | up through cuBLAS (float32 products) and fused.silu_mul: the default before 2026-12-06,
# and what GPUs without tensor descriptors (before Hopper) run (``options_for``)
COMPOSED = LargeStepOptions(swiglu_kernel=False, swiglu_config=None, interleave_gate_up=False, mlp_chunk_tokens=None)
_TMA = SwigluGemmConfig(tma=True)
VARIANTS = {
    "default": OPTIONS,
    "composed": COMPOSED,
    "bf16-qkv": replace(OPTIONS, float32_qkv=False),
    # the one-kernel SwiGLU over gate | up packed in order: pointer loads, then tensor descriptors
    # (one program per tile / per SM)
    "swiglu": replace(COMPOSED, swiglu_kernel=True),
    "swiglu-tma": replace(COMPOSED, swiglu_kernel=True, swiglu_config=_TMA),
    "swiglu-tma-persistent": replace(COMPOSED, swiglu_kernel=True, swiglu_config=replace(_TMA, persistent=True)),
    "swiglu-tma-8192": replace(COMPOSED, swiglu_kernel=True, swiglu_config=replace(_TMA, num_stages=4),
                               mlp_chunk_tokens=8192),
    # interleaved packs, persistent TMA kernel (the default), with 8192- or 2048-row MLP slices
    "swiglu-il": OPTIONS,
    "swiglu-il-2048": replace(OPTIONS, mlp_chunk_tokens=None),
    "mm-add": replace(COMPOSED, add_in_gemm=False),  # the default before 2026-12-05
    "one-row-silu": replace(COMPOSED, silu_row_tiles=False),  # the default before 2026-12-06
    "all": replace(OPTIONS, float32_qkv=False),
}


def options_for(device: torch.device | None) -> LargeStepOptions:
    """``OPTIONS`` as ``device`` can run them: a GPU without tensor descriptors (compute
    capability below 9) takes the composed SwiGLU where OPTIONS asks for the TMA kernel (its
    pointer-load form was slower than cuBLAS + silu_mul on the H200 too)."""
    opts = OPTIONS
    tma = opts.swiglu_kernel and opts.swiglu_config is not None and opts.swiglu_config.tma
    if (tma or opts.interleave_gate_up) and device is not None and device.type == "cuda" \
            and torch.cuda.get_device_capability(device)[0] < 9:
        return replace(opts, swiglu_kernel=False, swiglu_config=None, interleave_gate_up=False,
                       mlp_chunk_tokens=COMPOSED.mlp_chunk_tokens)
    return opts


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias)."""
    if x.shape[0] <= SKINNY_MAX_ROWS:
        return skinny_linear(x, weight)
    return F.linear(x, weight)


def linear_wide(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32, unrounded where the kernel or torch allows (the q | k | v and
    gate | up products: the rotary embedding and silu x up then round once, to x's dtype)."""
    if x.shape[0] <= SKINNY_MAX_ROWS:
        return skinny_linear(x, weight, out_dtype=torch.float32)
    if x.dtype != torch.float32 and x.is_cuda and float32_products():
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x, weight).float()


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, add_in_gemm: bool = False
               ) -> torch.Tensor:
    """``residual += x @ weight.T`` in place, returning residual (the float32 stream), the
    product added unrounded: in the Triton kernel's epilogue, or from cuBLAS with a float32
    output where torch offers one (``torch.mm(..., out_dtype=)``; with ``add_in_gemm``,
    cuBLAS accumulates into the stream itself), else rounded to x's dtype."""
    if x.shape[0] <= SKINNY_MAX_ROWS and residual.dtype == torch.float32:
        return skinny_linear(x, weight, residual=residual, out=residual)
    if residual.dtype == torch.float32 and x.dtype != torch.float32 and x.is_cuda and float32_products():
        if add_in_gemm:
            return torch.ops.aten.addmm.dtype_out(residual, x, weight.t(), torch.float32, out=residual)
        return residual.add_(torch.mm(x, weight.t(), out_dtype=torch.float32))
    return residual.add_(F.linear(x, weight))


def linear_swiglu(x: torch.Tensor, weight: torch.Tensor, config: SwigluGemmConfig | None = None,
                  group: int = 0) -> torch.Tensor | None:
    """``silu(x @ gate.T) * (x @ up.T)`` in x's dtype from the packed gate | up ``weight`` (rows
    in the pack's order ``group``, see ``PackedProjection.interleave``), the products unrounded,
    in one kernel; None for the steps it leaves to the skinny GEMM + silu_mul (at most
    ``SKINNY_MAX_ROWS`` rows, no CUDA device outside Triton's interpreter, or an interleaved
    pack that tensor descriptors cannot read)."""
    if x.shape[0] <= SKINNY_MAX_ROWS or not (x.is_cuda or interpreting()):
        return None
    from kernels.swiglu_gemm import swiglu_linear, tma_ok

    # an interleaved pack needs tensor descriptors (16-byte aligned rows of x, weight and the
    # output); else the composed path serves, reading its product's stride-2 columns
    if group and not (tma_ok(x, weight) and (weight.shape[0] // 2 * x.element_size()) % 16 == 0):
        return None

    return swiglu_linear(x, weight, config=config, group=group)


_FLOAT32_PRODUCTS: bool | None = None


def float32_products() -> bool:
    """Whether this torch's CUDA ``mm`` takes ``out_dtype=torch.float32`` for bf16 operands
    (probed once, on the first call: make it outside CUDA-graph capture, as ``fast_block_ops``
    does)."""
    global _FLOAT32_PRODUCTS
    if _FLOAT32_PRODUCTS is None:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
            _FLOAT32_PRODUCTS = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _FLOAT32_PRODUCTS = False
    return _FLOAT32_PRODUCTS
