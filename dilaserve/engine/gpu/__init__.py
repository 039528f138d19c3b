"""The GPU fast path: Triton kernels behind the model runner's two hooks.

- attention: ``TritonPagedAttention`` takes the same constructor arguments and call as the
  pure-torch ``PagedAttention`` backend and computes the same function without gathering each
  request's keys into a padded tensor.
- logit budget: ``greedy_choices`` returns (argmax token, its softmax probability) for the
  queried rows straight from the LM head, never forming [rows, vocab] logits.
- block ops: RMSNorm, residual add + RMSNorm, rotary q+k and SiLU-mul as fused kernels
  (``kernels/fused.py``), passed to the model's forward.

``select_fast_path`` picks it for a CUDA device when triton imports; everything else (CPU,
no triton, ``kernels="torch"``) stays on the reference path. Importing this package does not
import triton.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class FastPath:
    attention: type  # an attention backend class with PagedAttention's constructor and call
    greedy_choices: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    block_ops: object = None  # dilaserve.models.layers.BlockOps, or None for the eager element-wise code


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_fast_path(device: torch.device, kernels: str = "auto") -> FastPath | None:
    """The Triton path for ``device``, or None for the reference path.

    ``kernels``: "auto" (Triton on CUDA when it imports), "torch" (never), "triton" (always;
    an error where it cannot run; on CPU it runs only in Triton's interpreter, for tests)."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "torch":
        return None
    on_device = device.type == "cuda" or (kernels == "triton" and _interpreting())
    if not (on_device and triton_available()):
        if kernels == "triton":
            raise RuntimeError(f"Triton kernels need a CUDA device and the triton package (device: {device})")
        return None
    from dilaserve.engine.gpu.attention import TritonPagedAttention
    from dilaserve.engine.gpu.logits import greedy_choices

    logger.info("using the Triton fast path on %s", device)
    return FastPath(TritonPagedAttention, greedy_choices, fast_block_ops(device))


def fast_block_ops(device: torch.device | None = None):
    """The fast path's ``BlockOps`` on ``device``: fused element-wise kernels, the float32
    residual stream, skinny-GEMM matmuls for small steps and ``matmul.options_for(device)``
    for large ones (``matmul.py``)."""
    import functools

    from dilaserve.engine.gpu import matmul
    from dilaserve.models.layers import MLP_CHUNK_TOKENS, BlockOps
    from kernels import fused

    if torch.cuda.is_available():
        matmul.float32_products()  # probe now, not inside a CUDA-graph capture
    opts = matmul.options_for(device)
    silu_mul = fused.silu_mul if opts.silu_row_tiles else functools.partial(fused.silu_mul, tile=fused.one_row_tile)
    return BlockOps(fused.rms_norm, fused.add_rms_norm, fused.rotary, silu_mul, residual_dtype=torch.float32,
                    linear=matmul.linear, linear_wide=matmul.linear_wide,
                    linear_add=functools.partial(matmul.linear_add, add_in_gemm=opts.add_in_gemm),
                    linear_swiglu=functools.partial(matmul.linear_swiglu, config=opts.swiglu_config)
                    if opts.swiglu_kernel else None,
                    wide_qkv=opts.float32_qkv, unrounded_max_rows=matmul.UNROUNDED_MAX_ROWS,
                    interleave_gate_up=opts.interleave_gate_up,
                    mlp_chunk_tokens=opts.mlp_chunk_tokens or MLP_CHUNK_TOKENS)


def _interpreting() -> bool:
    from kernels.interpreter import interpreting

    return interpreting()
