"""The bf16 fast path is closer to float32 than bf16 eager code: the float32 residual stream,
the unrounded o / down adds and the once-rounded q | k | v and gate | up products (#8)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from dilaserve.engine.gpu import fast_block_ops  # noqa: E402
from dilaserve.engine.gpu.attention import TritonPagedAttention  # noqa: E402
from dilaserve.engine.random_model import SHAPES, build_model  # noqa: E402
from dilaserve.models.attention import DenseAttention  # noqa: E402
from dilaserve.models.packing import pack_projections  # noqa: E402
from dilaserve.models.paged_attention import PagedKVCache  # noqa: E402


@torch.no_grad()
def test_bf16_fast_path_logits_are_closer_to_float32_than_eager_bf16(device):
    context, page = 64, 16
    ref = build_model(SHAPES["tiny"], device, seed=0, dtype=torch.float32)
    fast = build_model(SHAPES["tiny"], device, seed=0, dtype=torch.bfloat16)
    for p_ref, p_fast in zip(ref.parameters(), fast.parameters()):
        p_ref.copy_(p_fast)  # the bf16 model's values, held in float32
    spec = ref.spec
    ids = torch.randint(0, spec.mask_token_id, (context,), generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.arange(context, device=device)
    expected = ref.compute_logits(ref(ids, positions, DenseAttention([context]))).double()
    eager = fast.compute_logits(fast(ids, positions, DenseAttention([context]))).double()

    pack_projections(fast)
    cache = PagedKVCache(spec.num_layers, context // page, page, spec.num_kv_heads, spec.head_dim, torch.bfloat16,
                         device)
    slots, everything = positions, torch.ones(1, context, dtype=torch.bool, device=device)
    attn = TritonPagedAttention(cache, slots, slots.view(1, -1), everything, slots.view(1, -1), everything)
    fast_logits = fast.compute_logits(fast(ids, positions, attn, fast_block_ops())).double()

    def rel(x: torch.Tensor) -> float:
        return float((x - expected).norm() / expected.norm())

    assert rel(fast_logits) < 0.8 * rel(eager), (rel(fast_logits), rel(eager))
