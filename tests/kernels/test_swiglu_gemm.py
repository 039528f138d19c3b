"""The SwiGLU GEMM computes silu(x @ w_gate.T) * (x @ w_up.T) as the engine's large steps did
before it: float32 products, then ``fused.silu_mul`` into x's dtype (CPU: Triton interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.fused import silu_mul
from kernels.swiglu_gemm import SwigluGemmConfig, interleave_gate_up, swiglu_linear, swiglu_linear_reference

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


@pytest.mark.parametrize("m,inter,k", [(1, 16, 16), (37, 48, 40), (70, 32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [0, 1, 16])
@pytest.mark.parametrize("persistent", [False, True])
def test_tensor_descriptor_forms_match(m, inter, k, dtype, group, persistent, device):
    """Through tensor descriptors, on the packed weight (two dots) and on both interleaved row
    orders (one dot, split after), one program per tile or a few walking them all: rows past M,
    a K that the tile does not divide (40), several column tiles."""
    x = randn(m, k, dtype=dtype, device=device)
    w = randn(2 * inter, k, dtype=dtype, device=device, seed=1) / math.sqrt(k)
    cfg = SwigluGemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_stages=2, num_warps=4,
                           tma=True, persistent=persistent)
    out = swiglu_linear(x, interleave_gate_up(w, group), config=cfg, group=group)
    assert_one_rounding(out, composed(x, w), k)


def test_interleaved_row_orders():
    w = torch.arange(8.0).repeat_interleave(3).view(8, 3)  # gate rows 0-3, up rows 4-7
    assert interleave_gate_up(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert interleave_gate_up(w, 2)[:, 0].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert interleave_gate_up(w, 0) is w
    with pytest.raises(ValueError, match="divide"):
        interleave_gate_up(w, 3)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="tma"):
        swiglu_linear(x, w, config=SMALL, group=1)  # the pointer kernel reads the packed order only
    with pytest.raises(ValueError, match="block_n"):
        swiglu_linear(x, w, config=SwigluGemmConfig(16, 16, 16, tma=True), group=2)


def test_unaligned_rows_fall_back_to_pointer_loads(device):
    """A K of 13 bf16 (26-byte rows) cannot be described to TMA; the packed form then runs the
    pointer kernel (an interleaved weight is refused)."""
    x = randn(5, 13, dtype=torch.bfloat16, device=device)
    w = randn(2 * 16, 13, dtype=torch.bfloat16, device=device, seed=1) / math.sqrt(13)
    cfg = SwigluGemmConfig(16, 16, 16, 2, 2, 4, tma=True)
    assert_one_rounding(swiglu_linear(x, w, config=cfg), composed(x, w), 13)
    with pytest.raises(ValueError, match="aligned"):
        swiglu_linear(x, interleave_gate_up(w, 1), config=cfg, group=1)


def test_bad_arguments():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="2I"):
        swiglu_linear(x, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="dtype"):
        swiglu_linear(x, torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        SwigluGemmConfig(block_m=24)
    assert swiglu_linear(torch.zeros(0, 8), torch.zeros(4, 8)).shape == (0, 2)


def test_the_fast_path_leaves_unaligned_interleaved_steps_to_the_composed_path(device):
    """matmul.linear_swiglu on an interleaved pack whose rows TMA cannot describe (K = 13 bf16)
    returns None, so the block runs the composed path instead of failing."""
    from dilaserve.engine.gpu import matmul

    x = randn(40, 13, dtype=torch.bfloat16, device=device)
    w = interleave_gate_up(randn(2 * 16, 13, dtype=torch.bfloat16, device=device, seed=1), 1)
    cfg = SwigluGemmConfig(16, 16, 16, 2, 2, 4, tma=True)
    assert matmul.linear_swiglu(x, w, config=cfg, group=1) is None
    x = randn(40, 16, dtype=torch.bfloat16, device=device)
    w = randn(2 * 16, 16, dtype=torch.bfloat16, device=device, seed=1)
    out = matmul.linear_swiglu(x, interleave_gate_up(w, 1), config=cfg, group=1)
    assert_one_rounding(out, composed(x, w), 16)


@pytest.mark.parametrize("group", [0, 1])
def test_tensor_descriptors_write_into_an_out_view(group, device):
    """An ``out`` view narrower than its rows (stride 40, width 32): the descriptor clips the
    store to the view, nothing is written past it."""
    m, inter, k = 37, 32, 48
    x = randn(m, k, dtype=torch.bfloat16, device=device)
    w = randn(2 * inter, k, dtype=torch.bfloat16, device=device, seed=1) / math.sqrt(k)
    buf = torch.full((m, inter + 8), 7.0, dtype=torch.bfloat16, device=device)
    cfg = SwigluGemmConfig(16, 16, 16, 2, 2, 4, tma=True, persistent=True)
    out = swiglu_linear(x, interleave_gate_up(w, group), out=buf[:, :inter], config=cfg, group=group)
    assert out.data_ptr() == buf.data_ptr()
    assert_one_rounding(out, composed(x, w), k)
    assert torch.all(buf[:, inter:] == 7.0)
