"""The skinny GEMM kernels compute their pure-torch references (CPU: Triton interpreter).

Float32 results (float32 inputs, or any input with the float32 residual epilogue) agree with the
float32 reference to summation order; a bf16 output to one bf16 rounding. The fused silu_mul
variant is the plain kernel applied to ``fused.silu_mul``'s output, bit for bit on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.fused import silu_mul
from kernels.skinny_gemm import (
    DEFAULT_SMEM_BYTES, SkinnyGemmConfig, default_config, skinny_linear, skinny_linear_reference, skinny_silu_mul_linear,
    skinny_silu_mul_linear_reference,
)

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(40, 48), (100, 200)]  # (N, K): N a multiple of no column tile; K of 16 only, of 8 only
ROWS = [1, 3, 17, 70]  # 70: two row tiles of 64


def randn(*shape: int, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """Entries of a K-term sum of unit normals are ~sqrt(K): the absolute tolerance scales with it."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        rtol, atol = 1e-5, 5e-5 * math.sqrt(k)  # bf16 rounding would be ~4e-3 * sqrt(K)
    else:  # one rounding of a float32 sum that may differ from the reference's in its last bits
        rtol, atol = 2 ** -7, 1e-3 * math.sqrt(k)
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol)


def epilogue_case(m: int, n: int, epilogue: str, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(residual, out) for an epilogue: none, a float32 residual, or that residual updated in place."""
    if epilogue == "none":
        return None, None
    residual = 3 * randn(m, n, device=device, seed=5)
    return residual, residual if epilogue == "in_place" else None


@pytest.mark.parametrize("epilogue", ["none", "residual", "in_place"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_skinny_linear_matches_reference(m, n, k, dtype, epilogue, device):
    x = randn(m, k, dtype=dtype, device=device)
    w = randn(n, k, dtype=dtype, device=device, seed=1)
    residual, out = epilogue_case(m, n, epilogue, device)
    ref = skinny_linear_reference(x, w, residual=residual)
    assert ref.dtype == (torch.float32 if residual is not None else dtype)
    y = skinny_linear(x, w, residual=residual, out=out)
    if out is not None:
        assert y is residual
    assert_matches(y, ref, k)


@pytest.mark.parametrize("epilogue", ["none", "in_place"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, inner", [(1, 40, 48), (3, 100, 200), (17, 100, 200), (70, 40, 48)])
def test_silu_mul_linear_is_the_linear_of_fused_silu_mul(m, n, inner, dtype, epilogue, device):
    gate_up = 3 * randn(m, 2 * inner, dtype=dtype, device=device)
    w = randn(n, inner, dtype=dtype, device=device, seed=1)
    residual, out = epilogue_case(m, n, epilogue, device)
    ref = skinny_silu_mul_linear_reference(gate_up, w, residual=residual)
    y = skinny_silu_mul_linear(gate_up, w, residual=None if residual is None else residual.clone(),
                               out=None if out is None else out.clone())
    assert_matches(y, ref, inner)
    # The same A operand, rounded as silu_mul rounds it, through the same tiles: identical bits
    # on the GPU (libdevice's expf in both kernels). The interpreter takes exp from NumPy, whose
    # SIMD and scalar paths may differ in the last bit by tile shape and CPU (seen on a CI
    # machine: one float32 silu value), so there the two agree to summation order.
    unfused = skinny_linear(silu_mul(gate_up), w, residual=residual, out=out)
    if device.type == "cuda":
        assert torch.equal(y, unfused)
    else:
        assert_matches(y, unfused, inner)


CONFIGS = [
    SkinnyGemmConfig(block_m=16, block_n=16, block_k=16, num_stages=2),  # K divisible by BLOCK_K: no K mask
    SkinnyGemmConfig(block_m=32, block_n=64, block_k=64, swap_ab=True),
    SkinnyGemmConfig(block_m=16, block_n=32, block_k=128, num_stages=1, num_warps=8),
    SkinnyGemmConfig(block_m=128, block_n=16, block_k=32, num_stages=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}{'-swap' * c.swap_ab}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_config_computes_the_same_function(config, dtype, device):
    m, n = 17, 100
    for k in (48, 200):
        x = randn(m, k, dtype=dtype, device=device)
        w = randn(n, k, dtype=dtype, device=device, seed=1)
        residual = randn(m, n, device=device, seed=2)
        assert_matches(skinny_linear(x, w, config=config), skinny_linear_reference(x, w), k)
        ref = skinny_linear_reference(x, w, residual=residual)
        assert_matches(skinny_linear(x, w, residual=residual, out=residual, config=config), ref, k)
        gate_up = randn(m, 2 * k, dtype=dtype, device=device, seed=3)
        ref = skinny_silu_mul_linear_reference(gate_up, w)
        assert_matches(skinny_silu_mul_linear(gate_up, w, config=config), ref, k)
    # A dict names some fields; the rest come from the default config.
    assert_matches(skinny_linear(x, w, config={"block_n": 16, "swap_ab": True}), skinny_linear_reference(x, w), k)


def test_strided_rows_and_an_output_view(device):
    """x and w as row-strided views (columns of wider buffers), y written into a column slice."""
    m, n, k = 5, 40, 48
    x_buf = randn(m, k + 24, dtype=torch.bfloat16, device=device)
    w_buf = randn(n, k + 8, dtype=torch.bfloat16, device=device, seed=1)
    x, w = x_buf[:, 8:8 + k], w_buf[:, :k]
    out_buf = torch.full((m, n + 16), 7.0, dtype=torch.bfloat16, device=device)
    y = skinny_linear(x, w, out=out_buf[:, 16:])
    assert_matches(y, skinny_linear_reference(x.contiguous(), w.contiguous()), k)
    assert torch.equal(out_buf[:, :16], torch.full((m, 16), 7.0, dtype=torch.bfloat16, device=device))


def test_reference_is_the_float32_linear(device):
    x, w = randn(3, 48, dtype=torch.bfloat16, device=device), randn(40, 48, dtype=torch.bfloat16, device=device)
    residual = randn(3, 40, device=device, seed=2)
    assert torch.equal(skinny_linear_reference(x, w), F.linear(x.float(), w.float()).to(torch.bfloat16))
    assert torch.equal(skinny_linear_reference(x, w, residual=residual), residual + F.linear(x.float(), w.float()))


def test_empty_rows_and_default_config(device):
    w = randn(40, 48, device=device)
    assert skinny_linear(torch.empty(0, 48, device=device), w).shape == (0, 40)
    cfg = default_config(70, 4096, 4096, torch.device("cpu"))
    assert cfg.block_m == 64 and cfg.block_n in (16, 32, 64)
    assert default_config(1, 4096, 4096, torch.device("cpu")).block_m == 16
    # float32 operands take twice the shared memory a stage: the default pipeline gets shallower
    # (5 stages of 32 + 64 rows x 128 float32 columns would need 240 KiB, more than a GPU block has).
    for rows, element_size in ((17, 4), (70, 4), (70, 2), (32, 2)):
        cfg = default_config(rows, 4096, 4096, torch.device("cpu"), element_size)
        assert cfg.smem_bytes(element_size=element_size) <= DEFAULT_SMEM_BYTES
    assert default_config(32, 4096, 4096, torch.device("cpu")).num_stages == 5  # bf16: the swept config
    assert default_config(17, 4096, 4096, torch.device("cpu"), 4).num_stages < 5


def test_bad_inputs_raise_value_error(device):
    x = randn(3, 48, dtype=torch.bfloat16, device=device)
    w = randn(40, 48, dtype=torch.bfloat16, device=device)
    residual = torch.zeros(3, 40, device=device)
    bad_calls = {
        "disagree on K": lambda: skinny_linear(x, randn(40, 32, dtype=torch.bfloat16, device=device)),
        "share one dtype": lambda: skinny_linear(x, w.float()),
        "2-D": lambda: skinny_linear(x[0], w),
        "last dimension must be contiguous": lambda: skinny_linear(x.t().contiguous().t(), w),
        "residual must be a float32": lambda: skinny_linear(x, w, residual=residual.bfloat16()),
        "out must be a": lambda: skinny_linear(x, w, residual=residual, out=torch.empty(3, 40, device=device,
                                                                                        dtype=torch.bfloat16)),
        "gate_up must be": lambda: skinny_silu_mul_linear(randn(3, 97, device=device), w.float()),
        "unknown config keys": lambda: skinny_linear(x, w, config={"block_q": 16}),
        "block_n must be a power of two": lambda: skinny_linear(x, w, config={"block_n": 24}),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="dtype"):
        skinny_linear(x.int(), w.int())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 128])
def test_llada_shapes_match_cublas_and_are_deterministic(m):
    """LLaDA-8B's o (4096 x 4096) and down (4096 x 12288) projections in bf16, as the engine calls them."""
    device = torch.device("cuda")
    for n, k in ((4096, 4096), (4096, 12288)):
        x = randn(m, k, dtype=torch.bfloat16, device=device)
        w = randn(n, k, dtype=torch.bfloat16, device=device, seed=1)
        y = skinny_linear(x, w)
        assert_matches(y, F.linear(x, w), k)
        assert torch.equal(y, skinny_linear(x, w)), "no split-K atomics: the same bits every call"
        residual = randn(m, n, device=device, seed=2)
        expected = residual + F.linear(x.float(), w.float())
        assert_matches(skinny_linear(x, w, residual=residual, out=residual), expected, k)
    gate_up = randn(m, 2 * 12288, dtype=torch.bfloat16, device=device, seed=3)
    w = randn(4096, 12288, dtype=torch.bfloat16, device=device, seed=4)
    assert torch.equal(skinny_silu_mul_linear(gate_up, w), skinny_linear(silu_mul(gate_up), w))


def test_float32_output_is_the_unrounded_product(device):
    x = randn(5, 48, dtype=torch.bfloat16, device=device)
    w = randn(40, 48, dtype=torch.bfloat16, device=device)
    out = skinny_linear(x, w, out_dtype=torch.float32)
    ref = x.float() @ w.float().T
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(skinny_linear(x, w, out_dtype=torch.bfloat16), skinny_linear(x, w))
    with pytest.raises(ValueError, match="out_dtype"):
        skinny_linear(x, w, out_dtype=torch.float16)
