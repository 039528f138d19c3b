"""The fused block ops compute what the eager code of ``dilaserve.models.layers`` computes.

Each kernel is compared with its pure-torch reference, and each reference with the layers code
itself (exactly), so neither can drift from the model. Rotary, the residual sum and silu_mul
repeat the eager float32 operations one for one: they must agree bit for bit in every dtype
(silu's float32 output to exp's last bit). RMSNorm sums its squares in another order: float32
agrees to ~1e-7, a low-precision output to a rare one-ulp flip. (CPU: Triton interpreter.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels.fused as fused
from dilaserve.models.attention import padded_attention
from dilaserve.models.layers import RMSNorm, apply_rotary, rotary_cos_sin, transformer_block

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# ||out - ref|| / ||ref|| for RMSNorm outputs (the only kernel that rounds differently).
NORM_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EPS = 1e-5
THETA = 10000.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def randn(*shape: int, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def norm_module(dim: int, dtype: torch.dtype, device) -> RMSNorm:
    norm = RMSNorm(dim, EPS).to(dtype=dtype, device=device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * randn(dim, seed=7))
    return norm


# --- RMSNorm ------------------------------------------------------------------------------------

NORM_CASES = [(1, 48), (3, 100), (33, 257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows, dim", NORM_CASES)
def test_rms_norm_matches_reference_and_layers(num_rows, dim, dtype, device):
    x = 3 * randn(num_rows, dim, dtype=dtype, device=device)
    norm = norm_module(dim, dtype, device)
    ref = fused.rms_norm_reference(x, norm.weight, EPS)
    assert torch.equal(ref, norm(x)), "the reference is RMSNorm.forward"
    out = fused.rms_norm(x, norm.weight, EPS)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= NORM_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_rows, dim", NORM_CASES)
def test_add_rms_norm_matches_reference(num_rows, dim, dtype, device):
    x = randn(num_rows, dim, dtype=dtype, device=device)
    residual = randn(num_rows, dim, dtype=dtype, device=device, seed=1)
    norm = norm_module(dim, dtype, device)
    ref_normed, ref_sum = fused.add_rms_norm_reference(x, residual, norm.weight, EPS)
    assert torch.equal(ref_sum, x + residual) and torch.equal(ref_normed, norm(x + residual))
    normed, total = fused.add_rms_norm(x, residual, norm.weight, EPS)
    assert torch.equal(total, ref_sum), "the sum is one rounding of x + residual, as torch adds"
    assert rel_err(normed, ref_normed) <= NORM_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_stream_in_chunks_and_update_the_residual_in_place(dtype, device, monkeypatch):
    monkeypatch.setattr(fused, "MAX_NORM_BLOCK", 64)  # 257 columns: five chunks
    x, residual = randn(3, 257, dtype=dtype, device=device), randn(3, 257, dtype=dtype, device=device, seed=1)
    weight = norm_module(257, dtype, device).weight
    ref_normed, ref_sum = fused.add_rms_norm_reference(x, residual, weight, EPS)
    assert rel_err(fused.rms_norm(x, weight, EPS), fused.rms_norm_reference(x, weight, EPS)) <= NORM_TOLERANCE[dtype]
    normed, total = fused.add_rms_norm(x, residual, weight, EPS, residual_out=residual)
    assert total is residual and torch.equal(residual, ref_sum)
    assert rel_err(normed, ref_normed) <= NORM_TOLERANCE[dtype]


@pytest.mark.parametrize("num_rows, dim", NORM_CASES)
def test_float32_residual_stream_with_bf16_branches(num_rows, dim, device, monkeypatch):
    """A bf16 projection output added to a float32 stream: the sum is not rounded to bf16, and
    the normalised row comes out in the matmuls' dtype (out_dtype)."""
    x = randn(num_rows, dim, dtype=torch.bfloat16, device=device)
    stream = randn(num_rows, dim, dtype=torch.float32, device=device, seed=1)
    weight = norm_module(dim, torch.bfloat16, device).weight
    ref_normed, ref_sum = fused.add_rms_norm_reference(x, stream, weight, EPS, out_dtype=torch.bfloat16)
    assert ref_sum.dtype == torch.float32 and torch.equal(ref_sum, x.float() + stream)
    normed, total = fused.add_rms_norm(x, stream, weight, EPS, out_dtype=torch.bfloat16)
    assert total.dtype == torch.float32 and torch.equal(total, ref_sum)
    assert normed.dtype == torch.bfloat16 and rel_err(normed, ref_normed) <= NORM_TOLERANCE[torch.bfloat16]
    out = fused.rms_norm(stream, weight, EPS, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, fused.rms_norm_reference(stream, weight, EPS, torch.bfloat16)) <= NORM_TOLERANCE[torch.bfloat16]
    monkeypatch.setattr(fused, "MAX_NORM_BLOCK", 64)  # wide rows, in place: the stream stays float32
    normed, total = fused.add_rms_norm(x, stream, weight, EPS, residual_out=stream, out_dtype=torch.bfloat16)
    assert total is stream and torch.equal(stream, ref_sum)
    with pytest.raises(ValueError, match="float32 stream"):
        fused.add_rms_norm(x, stream.half(), weight, EPS)


def test_rms_norm_promotes_like_torch_and_serves_qk_norm(device):
    x = randn(3, 4, 24, dtype=torch.bfloat16, device=device)
    weight = norm_module(24, torch.float32, device).weight  # float32 scale of bf16 rows -> float32
    out = fused.rms_norm(x.view(-1, 24), weight, EPS).view(x.shape)
    ref = RMSNorm.forward(SimpleNamespace(weight=weight, eps=EPS), x)  # per head, as QK-norm
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-6


# --- Rotary -------------------------------------------------------------------------------------

ROTARY_CASES = [(1, 4, 2, 24), (3, 4, 2, 64), (33, 4, 4, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens, heads, kv_heads, head_dim", ROTARY_CASES)
def test_rotary_matches_reference_and_layers_exactly(num_tokens, heads, kv_heads, head_dim, dtype, device):
    q = randn(num_tokens, heads, head_dim, dtype=dtype, device=device)
    k = randn(num_tokens, kv_heads, head_dim, dtype=dtype, device=device, seed=1)
    positions = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:num_tokens].to(device)
    cos, sin = rotary_cos_sin(positions, head_dim, THETA)
    ref = fused.rotary_reference(q, k, cos, sin)
    assert torch.equal(ref[0], apply_rotary(q, cos, sin)) and torch.equal(ref[1], apply_rotary(k, cos, sin))
    for out, expected in zip(fused.rotary(q, k, cos, sin), ref):
        assert out.dtype == dtype and torch.equal(out, expected)
    # Whole tables indexed in the kernel: the same rows as the gathered ones.
    cos_table, sin_table = rotary_cos_sin(torch.arange(300, device=device), head_dim, THETA)
    for out, expected in zip(fused.rotary(q, k, cos_table, sin_table, positions), ref):
        assert torch.equal(out, expected)


def test_rotary_reads_strided_positions_and_fused_qkv_views_in_place(device):
    num_tokens, heads, kv_heads, head_dim = 5, 4, 2, 24
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16, device=device)
    q, k, _ = qkv.view(num_tokens, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    every_other = torch.tensor([9, 0, 4, 0, 17, 0, 2, 0, 30, 0], device=device)[::2]  # stride 2
    cos_table, sin_table = rotary_cos_sin(torch.arange(64, device=device), head_dim, THETA)
    ref_q, ref_k = fused.rotary_reference(q.clone(), k.clone(), cos_table, sin_table, every_other)
    untouched = qkv[:, (heads + kv_heads) * head_dim:].clone()
    q_out, k_out = fused.rotary_(q, k, cos_table, sin_table, every_other)
    assert q_out is q and k_out is k
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], untouched), "v is not written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens, heads, kv_heads, head_dim", ROTARY_CASES)
def test_rotary_store_kv_writes_the_cache_slots_in_the_same_launch(num_tokens, heads, kv_heads, head_dim, dtype,
                                                                    device):
    """q | k | v as views of one packed projection; k, v land at scattered slots of the pools,
    every other slot keeps its old contents, and q / the cached k match rotary + write_kv."""
    qkv = randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.view(num_tokens, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    num_slots = 2 * num_tokens + 5
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(3))[:num_tokens].to(device)
    pools = [randn(num_slots, kv_heads, head_dim, dtype=dtype, device=device, seed=s) for s in (4, 5)]
    ref_pools = [p.clone() for p in pools]
    positions = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:num_tokens].to(device)
    cos, sin = rotary_cos_sin(positions, head_dim, THETA)
    ref_q = fused.rotary_store_kv_reference(q, k, v, cos, sin, *ref_pools, slots)
    assert torch.equal(ref_q, fused.rotary_reference(q, k, cos, sin)[0])
    before = qkv.clone()
    q_out = fused.rotary_store_kv(q, k, v, cos, sin, *pools, slots)
    assert torch.equal(q_out, ref_q)
    assert torch.equal(pools[0], ref_pools[0]) and torch.equal(pools[1], ref_pools[1])
    assert torch.equal(qkv, before), "the projection's output is only read"
    with pytest.raises(ValueError, match="shape mismatch"):
        fused.rotary_store_kv(q, k, v, cos, sin, pools[0], pools[1][:, :1], slots)


def test_rotary_store_kv_rounds_float32_products_once_into_bf16_pools(device):
    """float32 q, k, v (unrounded projections): rotated in float32, rounded once, to the pools'
    dtype, which the returned q has too."""
    num_tokens, heads, kv_heads, head_dim = 5, 4, 2, 24
    q, k, v = (randn(num_tokens, h, head_dim, device=device, seed=s) for s, h in ((0, heads), (1, kv_heads),
                                                                              (2, kv_heads)))
    slots = torch.tensor([7, 0, 3, 9, 4], device=device)
    pools = [torch.zeros(10, kv_heads, head_dim, dtype=torch.bfloat16, device=device) for _ in range(2)]
    ref_pools = [p.clone() for p in pools]
    cos, sin = rotary_cos_sin(torch.arange(num_tokens, device=device) * 3, head_dim, THETA)
    ref_q = fused.rotary_store_kv_reference(q, k, v, cos, sin, *ref_pools, slots)
    rotated_q, rotated_k = fused.rotary_reference(q, k, cos, sin)
    assert ref_q.dtype == torch.bfloat16 and torch.equal(ref_q, rotated_q.to(torch.bfloat16))
    assert torch.equal(ref_pools[0][slots], rotated_k.to(torch.bfloat16))
    out = fused.rotary_store_kv(q, k, v, cos, sin, *pools, slots)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_q)
    assert torch.equal(pools[0], ref_pools[0]) and torch.equal(pools[1], ref_pools[1])


# --- SwiGLU -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows, width", [(1, 48), (3, 100), (33, 257)])
def test_silu_mul_matches_reference(num_rows, width, dtype, device):
    gate_up = 4 * randn(num_rows, 2 * width, dtype=dtype, device=device)
    gate, up = gate_up[:, :width], gate_up[:, width:]
    ref = fused.silu_mul_reference(gate_up)
    assert torch.equal(ref, F.silu(gate) * up) and torch.equal(fused.silu_mul_reference(gate, up), ref)
    for out in (fused.silu_mul(gate_up), fused.silu_mul(gate.contiguous(), up.contiguous())):
        assert out.dtype == dtype
        if dtype == torch.float32:  # exp may differ from torch's in its last bit
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        else:  # ... which a low-precision rounding almost never shows
            assert (out != ref).float().mean() <= 0.01 and rel_err(out, ref) <= 1e-3


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_silu_mul_tile_computes_the_same_bits(in_dtype, device):
    """The fast path passes float32 gate | up products and a bf16 ``out`` on large steps (multi-row
    tiles there), bf16 rows on small ones: ragged edges in both dimensions, each tile the same."""
    gate_up = 4 * randn(70, 2 * 100, dtype=torch.float32, device=device).to(in_dtype)
    gate, up = gate_up[:, :100], gate_up[:, 100:]
    ref = fused.silu_mul(gate, up, out=torch.empty(70, 100, dtype=torch.bfloat16, device=device),
                         tile=fused.one_row_tile)
    expected = (F.silu(gate) * up).to(torch.bfloat16)  # one rounding from float32; bf16 in: torch's own
    assert (ref != expected).float().mean() <= 0.01 and rel_err(ref, expected) <= 1e-3
    assert fused.silu_mul_tile(70, 100).rows > 1  # the default for this many rows is a multi-row tile
    for tile in (None, fused.SiluMulTile(8, 32, 4), fused.SiluMulTile(4, 64, 2), fused.SiluMulTile(16, 128, 8)):
        out = fused.silu_mul(gate, up, out=torch.empty(70, 100, dtype=torch.bfloat16, device=device), tile=tile)
        assert torch.equal(out, ref), tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_reads_an_interleaved_gate_up_product(dtype, device):
    """An interleaved gate | up product (gate j, up j adjacent: ``PackedProjection.interleave``)
    gives gate and up as stride-2 column views; silu_mul reads them in place, same bits as from
    contiguous copies, for both tile shapes."""
    product = randn(70, 2 * 37, device=device).to(dtype)
    gate, up = product[:, 0::2], product[:, 1::2]
    for tile in (fused.one_row_tile, fused.silu_mul_tile(128, 37)):
        out = fused.silu_mul(gate, up, out=torch.empty(70, 37, dtype=torch.bfloat16, device=device), tile=tile)
        expect = fused.silu_mul(gate.contiguous(), up.contiguous(),
                                out=torch.empty(70, 37, dtype=torch.bfloat16, device=device), tile=tile)
        assert torch.equal(out, expect)


def test_inputs_with_a_strided_last_dimension_are_refused(device):
    x = randn(4, 8, device=device)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        fused.rms_norm(x.t(), torch.ones(4, device=device), EPS)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        fused.silu_mul(x[:, :2], x[:, 2:4], out=torch.empty(2, 4, device=device).t())
    q = randn(2, 4, 8, device=device)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        fused.rotary(q.transpose(1, 2), q.transpose(1, 2), torch.ones(2, 1, 4), torch.ones(2, 1, 4))


# --- Composed: the eager layer stack, rewritten on the fused ops --------------------------------


def make_stack(num_layers: int, dim: int, heads: int, kv_heads: int, head_dim: int, inner: int,
               dtype: torch.dtype, device) -> tuple[nn.ModuleList, RMSNorm]:
    torch.manual_seed(3)
    blocks = nn.ModuleList()
    for _ in range(num_layers):
        b = nn.Module()
        b.attn_norm, b.mlp_norm = norm_module(dim, dtype, device), norm_module(dim, dtype, device)
        for name, (n_in, n_out) in {"q_proj": (dim, heads * head_dim), "k_proj": (dim, kv_heads * head_dim),
                                    "v_proj": (dim, kv_heads * head_dim), "o_proj": (heads * head_dim, dim),
                                    "gate_proj": (dim, inner), "up_proj": (dim, inner),
                                    "down_proj": (inner, dim)}.items():
            setattr(b, name, nn.Linear(n_in, n_out, bias=False).to(dtype=dtype, device=device))
        blocks.append(b)
    return blocks, norm_module(dim, dtype, device)


def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    visible = torch.ones(1, 1, q.shape[0], dtype=torch.bool, device=q.device)
    return padded_attention(q[None], k[None], v[None], visible)[0]


def eager_stack(x, blocks, final_norm, cos, sin, head_dim):
    for i, b in enumerate(blocks):
        x = transformer_block(
            x, layer_idx=i, attn_norm=b.attn_norm, q_proj=b.q_proj, k_proj=b.k_proj, v_proj=b.v_proj,
            o_proj=b.o_proj, mlp_norm=b.mlp_norm, gate_proj=b.gate_proj, up_proj=b.up_proj,
            down_proj=b.down_proj, rotary=(cos, sin), attn=attend, head_dim=head_dim)
    return final_norm(x)


def fused_stack(x, blocks, final_norm, cos, sin, head_dim, ops):
    """The proposed fast path: each block's closing residual add is fused with the next norm
    (the last one with the final norm), so a block runs 4 elementwise launches, not ~35."""
    n = x.shape[0]
    h, residual = ops.rms_norm(x, blocks[0].attn_norm.weight, EPS), x
    for i, b in enumerate(blocks):
        q, k, v = (proj(h).view(n, -1, head_dim) for proj in (b.q_proj, b.k_proj, b.v_proj))
        q, k = ops.rotary(q, k, cos, sin)
        h, residual = ops.add_rms_norm(b.o_proj(attend(i, q, k, v).reshape(n, -1)), residual,
                                       b.mlp_norm.weight, EPS)
        mlp = b.down_proj(ops.silu_mul(b.gate_proj(h), b.up_proj(h)))
        next_norm = blocks[i + 1].attn_norm if i + 1 < len(blocks) else final_norm
        h, residual = ops.add_rms_norm(mlp, residual, next_norm.weight, EPS)
    return h


REFERENCE_OPS = SimpleNamespace(rms_norm=fused.rms_norm_reference, add_rms_norm=fused.add_rms_norm_reference,
                                rotary=fused.rotary_reference, silu_mul=fused.silu_mul_reference)
KERNEL_OPS = SimpleNamespace(rms_norm=fused.rms_norm, add_rms_norm=fused.add_rms_norm,
                             rotary=fused.rotary, silu_mul=fused.silu_mul)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_fused_stack_computes_the_eager_stack(dtype, tolerance, device):
    num_tokens, dim, heads, kv_heads, head_dim, inner = 5, 48, 4, 2, 12, 100
    blocks, final_norm = make_stack(2, dim, heads, kv_heads, head_dim, inner, dtype, device)
    x = randn(num_tokens, dim, dtype=dtype, device=device)
    cos, sin = rotary_cos_sin(torch.tensor([3, 4, 5, 6, 40], device=device), head_dim, THETA)
    with torch.no_grad():
        eager = eager_stack(x, blocks, final_norm, cos, sin, head_dim)
        assert torch.equal(fused_stack(x, blocks, final_norm, cos, sin, head_dim, REFERENCE_OPS), eager)
        assert rel_err(fused_stack(x, blocks, final_norm, cos, sin, head_dim, KERNEL_OPS), eager) <= tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [32, 8192])
def test_llada_shapes_replay_from_a_cuda_graph(num_tokens):
    """LLaDA-8B shapes (d 4096, 32 x 128 heads, MLP 12288), bf16: the fused block ops, captured
    in one CUDA graph (positions indexed in the kernel), replay what the eager code computes."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = randn(num_tokens, 4096, dtype=dtype, device=device)
    delta = randn(num_tokens, 4096, dtype=dtype, device=device, seed=1)
    norm = norm_module(4096, dtype, device)
    q = randn(num_tokens, 32, 128, dtype=dtype, device=device, seed=2)
    k = randn(num_tokens, 32, 128, dtype=dtype, device=device, seed=3)
    gate_up = 4 * randn(num_tokens, 2 * 12288, dtype=dtype, device=device, seed=4)
    positions = torch.randperm(2 * num_tokens, device=device)[:num_tokens]
    cos, sin = rotary_cos_sin(torch.arange(2 * num_tokens, device=device), 128, THETA)

    def step():
        return (*fused.add_rms_norm(delta, x, norm.weight, EPS), *fused.rotary(q, k, cos, sin, positions),
                fused.silu_mul(gate_up))

    with torch.no_grad():
        step()  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        graph.replay()
        torch.cuda.synchronize()
        normed, total, q_rot, k_rot, mlp = outs
        assert torch.equal(total, x + delta)
        assert rel_err(normed, norm(x + delta)) <= NORM_TOLERANCE[dtype]
    assert torch.equal(q_rot, apply_rotary(q, cos[positions], sin[positions]))
    assert torch.equal(k_rot, apply_rotary(k, cos[positions], sin[positions]))
    gate, up = gate_up.chunk(2, dim=1)
    assert (mlp != F.silu(gate) * up).float().mean() <= 1e-3
