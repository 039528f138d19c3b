"""Padding a reuse step to a CUDA-graph bucket changes nothing for the real requests.

Checked on CPU with the pure-torch attention: the padded step's real rows equal the unpadded
step's, and its KV writes touch only the scratch slot besides the real ones.
"""

import pytest
import torch

from dilaserve.engine.gpu.graphs import StepInputs, StepShape, bucket_for, causal_attention_args, pad_step_inputs
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache

PAGE = 4


def step_inputs(requests, page_size=PAGE):
    """requests: (pages, seq_len, compute_start, compute_end, ids of the computed range)."""
    ids, positions, slots, qi, qv, ks, kv = [], [], [], [], [], [], []
    base = 0
    q_max = max(e - s for _, _, s, e, _ in requests)
    l_max = max(n for _, n, _, _, _ in requests)
    for pages, seq_len, start, end, tok in requests:
        all_slots = [pages[p // page_size] * page_size + p % page_size for p in range(seq_len)]
        ids += tok
        positions += range(start, end)
        slots += all_slots[start:end]
        n = end - start
        qi.append(list(range(base, base + n)) + [0] * (q_max - n))
        qv.append([True] * n + [False] * (q_max - n))
        ks.append(all_slots + [0] * (l_max - seq_len))
        kv.append([True] * seq_len + [False] * (l_max - seq_len))
        base += n
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)  # noqa: E731
    return StepInputs(t(ids), t(positions), t(slots), t(qi), t(qv, torch.bool), t(ks), t(kv, torch.bool))


def forward(model, cache, inputs, **extra):
    attn = PagedAttention(cache, inputs.slot_mapping, inputs.query_index, inputs.query_valid,
                          inputs.key_slots, inputs.key_valid, **extra)
    return model(inputs.input_ids, inputs.positions, attn)


def test_buckets_leave_room_for_the_padding():
    for shape in (StepShape(1, 32, 32, 40), StepShape(3, 70, 32, 513), StepShape(5, 97, 20, 1000),
                  StepShape(64, 2048, 32, 600), StepShape(7, 600, 128, 64)):
        target = bucket_for(shape, 16)
        assert target.tokens >= shape.tokens and target.queries >= shape.queries and target.keys >= shape.keys
        assert target.keys % 16 == 0
        dummies = -(-(target.tokens - shape.tokens) // target.queries)
        assert target.requests >= shape.requests + dummies


def test_padded_step_computes_the_same_rows(llada):
    torch.manual_seed(0)
    spec = llada.spec
    num_pages = 12
    scratch_slot = num_pages * PAGE  # one page past the requests' pages
    cache = PagedKVCache(spec.num_layers, num_pages + 1, PAGE, spec.num_kv_heads, spec.head_dim,
                         torch.float32, "cpu")
    for layer in range(spec.num_layers):  # some cached context to attend to
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    rand = lambda n: torch.randint(0, 300, (n,)).tolist()  # noqa: E731
    inputs = step_inputs([([0, 1, 2], 11, 4, 9, rand(5)), ([5, 3], 7, 1, 7, rand(6)), ([7, 8, 9, 10], 13, 8, 13, rand(5))])
    before_k = [k.clone() for k in cache.k]
    with torch.no_grad():
        expected = forward(llada, cache, inputs)
    after_k = [k.clone() for k in cache.k]
    for k, b in zip(cache.k, before_k):
        k.copy_(b)
    target = StepShape(8, 32, 8, 16)
    padded = pad_step_inputs(inputs, target, scratch_slot, pad_token_id=spec.mask_token_id)
    assert padded.shape == target
    with torch.no_grad():
        got = forward(llada, cache, padded)
    assert got.shape[0] == 32
    torch.testing.assert_close(got[:16], expected, rtol=1e-5, atol=1e-5)
    for layer in range(spec.num_layers):  # real slots written alike; only the scratch slot differs
        torch.testing.assert_close(cache.k[layer][:scratch_slot], after_k[layer][:scratch_slot])


def test_padded_block_causal_step_computes_the_same_rows(sdar):
    """SDAR (block 4): the graphs' block-causal arguments, gathered from the padded inputs, give
    the real rows what the runner's own arguments give the unpadded step."""
    torch.manual_seed(1)
    spec = sdar.spec
    block, num_pages = spec.causal_block_size, 12
    scratch_slot = num_pages * PAGE
    cache = PagedKVCache(spec.num_layers, num_pages + 1, PAGE, spec.num_kv_heads, spec.head_dim,
                         torch.float32, "cpu")
    for layer in range(spec.num_layers):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    rand = lambda n: torch.randint(0, 300, (n,)).tolist()  # noqa: E731
    # Exact-cache steps: keys end with the computed range; a block start recomputes the
    # previous block (8 tokens), a later step only the block (4).
    inputs = step_inputs([([0, 1, 2], 12, 4, 12, rand(8)), ([5, 3], 8, 4, 8, rand(4)),
                          ([7, 8, 9, 10], 16, 12, 16, rand(4))])
    starts = torch.tensor([4, 4, 12])
    runner_args = {"query_positions": starts.unsqueeze(1) + torch.arange(inputs.query_index.shape[1]),
                   "causal_block_size": block}
    torch.testing.assert_close(causal_attention_args(inputs, block)["query_positions"][:, 0], starts)
    before_k = [k.clone() for k in cache.k]
    with torch.no_grad():
        expected = forward(sdar, cache, inputs, **runner_args)
    for k, b in zip(cache.k, before_k):
        k.copy_(b)
    padded = pad_step_inputs(inputs, StepShape(8, 32, 8, 16), scratch_slot, pad_token_id=spec.mask_token_id)
    with torch.no_grad():
        got = forward(sdar, cache, padded, **causal_attention_args(padded, block))
    torch.testing.assert_close(got[:16], expected, rtol=1e-5, atol=1e-5)
    assert causal_attention_args(inputs, 0) == {}


def test_a_step_that_does_not_fit_is_refused():
    inputs = step_inputs([([0], 3, 0, 3, [1, 2, 3])])
    with pytest.raises(ValueError, match="does not fit"):
        pad_step_inputs(inputs, StepShape(2, 2, 8, 16), 99, 0)
    with pytest.raises(ValueError, match="no room"):
        pad_step_inputs(inputs, StepShape(1, 32, 8, 16), 99, 0)
