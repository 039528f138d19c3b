"""The SwiGLU GEMM computes silu(x @ w_gate.T) * (x @ w_up.T) as the engine's large steps did
before it: float32 products, then ``fused.silu_mul`` into x's dtype (CPU: Triton interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.fused import silu_mul
from kernels.swiglu_gemm import SwigluGemmConfig, swiglu_linear, swiglu_linear_reference

SMALL = SwigluGemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_stages=2, num_warps=4)


def randn(*shape: int, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def composed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the fast path ran above 32 rows: a float32-output matmul, then fused.silu_mul."""
    gate, up = (x.float() @ w.float().t()).chunk(2, dim=1)
    return silu_mul(gate.contiguous(), up.contiguous(), out=torch.empty(gate.shape, dtype=x.dtype, device=x.device))


def assert_one_rounding(out: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """Equal up to one rounding of sums that may differ in their last bits (entries of products of
    K-term sums of unit normals are ~K)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        rtol, atol = 1e-5, 1e-4 * k
    else:
        rtol, atol = 2 ** -7, 2e-3 * k
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("m,inter,k", [(1, 16, 16), (37, 40, 48), (70, 24, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_composed_matmul_and_silu_mul(m, inter, k, dtype, device):
    x = randn(m, k, dtype=dtype, device=device)
    w = randn(2 * inter, k, dtype=dtype, device=device, seed=1) / math.sqrt(k)
    out = swiglu_linear(x, w, config=SMALL)
    assert_one_rounding(out, composed(x, w), k)
    assert_one_rounding(out, swiglu_linear_reference(x, w), k)


def test_default_config_and_an_out_buffer(device):
    m, inter, k = 130, 136, 64  # more than one default row tile; columns past a tile
    x = randn(m, k, dtype=torch.bfloat16, device=device)
    w = randn(2 * inter, k, dtype=torch.bfloat16, device=device, seed=1) / math.sqrt(k)
    buf = torch.full((m, inter + 8), 7.0, dtype=torch.bfloat16, device=device)
    out = swiglu_linear(x, w, out=buf[:, :inter])
    assert_one_rounding(out, composed(x, w), k)
    assert torch.all(buf[:, inter:] == 7.0)  # nothing written past the view


def test_bad_arguments():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="2I"):
        swiglu_linear(x, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="dtype"):
        swiglu_linear(x, torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        SwigluGemmConfig(block_m=24)
    assert swiglu_linear(torch.zeros(0, 8), torch.zeros(4, 8)).shape == (0, 2)
