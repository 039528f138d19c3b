"""Packed projections (q|k|v, gate|up as one matmul): same outputs, no extra memory, never stale."""

from __future__ import annotations

import pytest
import torch

from dilaserve.models.attention import DenseAttention
from dilaserve.models.layers import BlockOps
from dilaserve.models.packing import pack_projections, packed
from dilaserve.models.registry import load_model
from kernels import fused

REFERENCE_OPS = BlockOps(fused.rms_norm_reference, fused.add_rms_norm_reference, fused.rotary_reference,
                         fused.silu_mul_reference)


def forward(model, lens=(5, 9, 3), ops=REFERENCE_OPS):
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 250, (n,), generator=gen) for n in lens])
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        return model(ids, positions, DenseAttention(list(lens)), ops)


def blocks(model):
    """(q, k, v) and (gate, up) modules per block, whatever the family's names."""
    for module in model.modules():
        if hasattr(module, "q_proj"):
            yield module.q_proj, module.k_proj, module.v_proj
        for gate in ("ff_proj", "gate_proj"):
            if hasattr(module, gate) and hasattr(module, "up_proj"):
                yield getattr(module, gate), module.up_proj


@pytest.fixture(params=["llada", "dream", "sdar"])
def checkpoint(request, llada_dir, dream_dir, sdar_dir):
    return {"llada": llada_dir, "dream": dream_dir, "sdar": sdar_dir}[request.param]


def test_packed_forward_equals_separate_projections(checkpoint):
    model = load_model(checkpoint)
    before = forward(model)
    num_params = sum(p.numel() for p in model.parameters())
    assert pack_projections(model) == 2 * model.spec.num_layers
    groups = list(blocks(model))
    assert groups and all(packed(*g) is not None for g in groups)
    torch.testing.assert_close(forward(model), before, rtol=1e-5, atol=1e-5)
    # The members are views of the packed weight: no parameter was copied or added.
    assert sum(p.numel() for p in model.parameters()) == num_params
    for group in groups:
        pack = packed(*group)
        for member in group:
            assert member.weight.untyped_storage().data_ptr() == pack.weight.untyped_storage().data_ptr()
            if member.bias is not None:
                assert member.bias.untyped_storage().data_ptr() == pack.bias.untyped_storage().data_ptr()
    assert any(m.bias is not None for g in groups for m in g) == (model.spec.model_type.lower() == "dream")


def test_packing_twice_keeps_the_packs(checkpoint):
    model = load_model(checkpoint)
    pack_projections(model)
    first = [packed(*g) for g in blocks(model)]
    pack_projections(model)
    assert [packed(*g) for g in blocks(model)] == first


def assert_in_place_load_reaches_the_packs(model, checkpoint):
    """A state dict loaded into the packed ``model`` (halved weights) changes its forward as it
    changes the unpacked model's."""
    other = load_model(checkpoint)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(forward(model), forward(other), rtol=1e-5, atol=1e-5)


def test_weights_loaded_after_packing_reach_the_packed_matmul(checkpoint):
    model = load_model(checkpoint)
    pack_projections(model)
    assert_in_place_load_reaches_the_packs(model, checkpoint)


def test_a_replaced_weight_makes_its_pack_stale(checkpoint):
    model = load_model(checkpoint)
    pack_projections(model)
    q, k, v = next(g for g in blocks(model) if len(g) == 3)
    q.weight = torch.nn.Parameter(q.weight.detach().clone() * 2)
    assert packed(q, k, v) is None
    # The block falls back to its separate matmuls, so the new weight is used.
    fresh = load_model(checkpoint)
    fresh_q = next(g for g in blocks(fresh) if len(g) == 3)[0]
    with torch.no_grad():
        fresh_q.weight.mul_(2)
    torch.testing.assert_close(forward(model), forward(fresh), rtol=1e-5, atol=1e-5)


def test_only_the_exact_group_matches(checkpoint):
    model = load_model(checkpoint)
    pack_projections(model)
    q, k, v = next(g for g in blocks(model) if len(g) == 3)
    assert packed(q, k) is None
    assert packed(k, q, v) is None
    assert packed(v) is None


@pytest.mark.parametrize("interleave", [False, True])
def test_mlp_in_slices_equals_the_whole(checkpoint, interleave):
    """A step longer than ``BlockOps.mlp_chunk_tokens`` runs its MLP slice by slice: same hidden
    states (gate | up packed in order or interleaved)."""
    import dataclasses

    model = load_model(checkpoint)
    pack_projections(model, interleave_pairs=interleave)
    whole = forward(model, lens=(7, 12, 5))
    sliced = dataclasses.replace(REFERENCE_OPS, mlp_chunk_tokens=5)  # 24 tokens: slices of 5, the last of 4
    calls = []
    silu_mul = sliced.silu_mul
    sliced = dataclasses.replace(sliced, silu_mul=lambda g, u=None, **kw: calls.append(g.shape[0]) or silu_mul(g, u))
    torch.testing.assert_close(forward(model, lens=(7, 12, 5), ops=sliced), whole, rtol=1e-6, atol=1e-6)
    assert calls and max(calls) == 5  # the MLP did run in slices


def test_interleaved_gate_up_computes_the_same(checkpoint):
    """gate | up interleaved row by row (for the one-dot SwiGLU kernel): the same forward, the
    members still views of the one packed weight holding their own rows, q | k | v untouched,
    and a later in-place load still reaches the pack."""
    model = load_model(checkpoint)
    before = forward(model)
    originals = {id(m): m.weight.detach().clone() for g in blocks(model) for m in g}
    pack_projections(model, interleave_pairs=True)
    for group in blocks(model):
        pack = packed(*group)
        assert pack is not None and pack.group == (1 if len(group) == 2 else 0)
        for member in group:
            assert torch.equal(member.weight, originals[id(member)])
            assert member.weight.untyped_storage().data_ptr() == pack.weight.untyped_storage().data_ptr()
        if len(group) == 2:
            assert torch.equal(pack.weight[0::2], originals[id(group[0])])
    torch.testing.assert_close(forward(model), before, rtol=1e-5, atol=1e-5)
    first = [packed(*g) for g in blocks(model)]
    pack_projections(model, interleave_pairs=True)  # again: nothing moves
    assert [packed(*g) for g in blocks(model)] == first
    torch.testing.assert_close(forward(model), before, rtol=1e-5, atol=1e-5)
    assert_in_place_load_reaches_the_packs(model, checkpoint)


def test_packing_in_order_again_undoes_the_interleave(checkpoint):
    """A model packed for the interleaved kernel, then for block ops that read gate | up in order
    (a second engine on it): the packs are back in order, members contiguous row views, same
    forward, and in-place loads still reach them."""
    model = load_model(checkpoint)
    before = forward(model)
    pack_projections(model, interleave_pairs=True)
    first = [packed(*g) for g in blocks(model)]
    pack_projections(model)
    assert [packed(*g) for g in blocks(model)] == first  # the same packs, reordered in place
    for group in blocks(model):
        pack = packed(*group)
        assert pack.group == 0
        offset = 0
        for member in group:
            assert member.weight.is_contiguous()
            assert member.weight.data_ptr() == pack.weight[offset:].data_ptr()
            offset += member.out_features
    torch.testing.assert_close(forward(model), before, rtol=1e-5, atol=1e-5)
    assert_in_place_load_reaches_the_packs(model, checkpoint)


def test_float32_residual_stream_halves_bf16_error():
    """A bf16 LLaDA-style model (16 layers) on the fused block path against the same weights in
    float32: a float32 residual stream cuts the hidden states' error by about half."""
    import dataclasses

    from dilaserve.engine.random_model import build_model

    shape = dict(d_model=256, n_layers=16, n_heads=4, mlp_hidden_size=768, vocab_size=512, mask_token_id=500,
                 eos_token_id=501)
    reference = build_model(shape, torch.device("cpu"), seed=0, dtype=torch.float32)
    fast = build_model(shape, torch.device("cpu"), seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        for p_ref, p_fast in zip(reference.parameters(), fast.parameters()):
            p_ref.copy_(p_fast)
    ids = torch.randint(0, 500, (96,), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(96)
    with torch.no_grad():
        expected = reference(ids, positions, DenseAttention([96])).double()

        def error(ops):
            got = fast(ids, positions, DenseAttention([96]), ops)
            assert got.dtype == torch.bfloat16  # the final norm hands the LM head the matmul dtype
            return float((got.double() - expected).norm() / expected.norm())

        bf16_stream = error(REFERENCE_OPS)
        float32_stream = error(dataclasses.replace(REFERENCE_OPS, residual_dtype=torch.float32))
    assert float32_stream < 0.7 * bf16_stream, (float32_stream, bf16_stream)



def test_only_bias_free_pairs_of_one_width_are_interleaved():
    """A gate | up pair with a bias (or q | k | v) is left in order by pack_projections, and
    PackedProjection.interleave refuses it."""
    from dilaserve.models.packing import PackedProjection

    torch.manual_seed(0)
    with_bias = PackedProjection((torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)))
    assert not with_bias.can_interleave()
    with pytest.raises(ValueError, match="bias-free"):
        with_bias.interleave()
    uneven = PackedProjection((torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 4, bias=False)))
    assert not uneven.can_interleave()
    pair = PackedProjection((torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 6, bias=False)))
    x = torch.randn(3, 8)
    before = [t.clone() for t in pair(x)]
    pair.interleave()
    assert pair.group == 1 and all(torch.allclose(a, b) for a, b in zip(pair(x), before))
