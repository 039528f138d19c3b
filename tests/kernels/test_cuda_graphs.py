"""Reuse steps replayed from CUDA graphs compute what the eager Triton path computes (GPU only)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_step_padding import step_inputs

pytestmark = pytest.mark.gpu


def _setup(seed=0):
    pytest.importorskip("triton")
    from dilaserve.engine.gpu.attention import TritonPagedAttention
    from dilaserve.engine.random_model import TINY, build_model
    from dilaserve.models.paged_attention import PagedKVCache

    device = torch.device("cuda")
    model = build_model(TINY, device, seed=seed, dtype=torch.bfloat16)
    spec = model.spec
    page, num_pages = 4, 16
    cache = PagedKVCache(spec.num_layers, num_pages + 1, page, spec.num_kv_heads, spec.head_dim, torch.bfloat16, device)
    for layer in range(spec.num_layers):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    return model, cache, TritonPagedAttention, num_pages * page


def test_graph_replay_matches_eager():
    from dilaserve.engine.gpu.graphs import ReuseGraphs
    from dilaserve.models.layers import rotary_cos_sin

    model, cache, attention_cls, scratch = _setup()
    rotary_cos_sin(torch.arange(8, device="cuda"), model.spec.head_dim, model.spec.rope_theta)  # the table
    graphs = ReuseGraphs(model, cache, attention_cls, scratch, model.spec.mask_token_id)
    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        rand = lambda n: torch.randint(0, 400, (n,), generator=gen).tolist()  # noqa: E731
        requests = [([0, 1, 2], 11, 4, 9, rand(5)), ([5, 3], 7, 1, 7, rand(6))][: 1 + trial % 2]
        inputs = step_inputs(requests)
        saved = [k.clone() for k in cache.k]
        with torch.no_grad():
            dev = inputs.to("cuda")
            attn = attention_cls(cache, dev.slot_mapping, dev.query_index, dev.query_valid, dev.key_slots, dev.key_valid)
            eager = model(dev.input_ids, dev.positions, attn).float()
        for k, s in zip(cache.k, saved):
            k.copy_(s)
        replayed = graphs.run(inputs)
        assert replayed is not None and replayed.shape == eager.shape
        torch.testing.assert_close(replayed.float(), eager, rtol=2e-2, atol=2e-2)
    assert graphs.num_captures >= 1 and graphs.num_replays == 3


@pytest.mark.parametrize("decoding", [dict(steps=8), dict(threshold=0.7)])
def test_engine_with_graphs_decodes_as_without(decoding):
    """The engine with reuse steps replayed from graphs gives the eager path's tokens (float32)."""
    pytest.importorskip("triton")
    from dilaserve.engine.random_model import TINY, build_model
    from dilaserve.engine.sampling_params import SamplingParams
    from tests.engine.helpers import make_prompts

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(TINY, torch.device("cuda"), seed=1, dtype=torch.float32)
    prompts = make_prompts(5, seed=3, lo=3, hi=40)
    params = SamplingParams(max_tokens=32, block_size=16, cache="dual", **decoding)
    assert_graphs_decode_as_eager(model, [(f"r{i}", p, params) for i, p in enumerate(prompts)])


def assert_graphs_decode_as_eager(model, requests) -> None:
    """The Triton engine with CUDA graphs (which it must replay) gives the eager engine's tokens."""
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from tests.engine.helpers import run_to_completion

    outs = {}
    for graphs in (False, True):
        engine = Engine(model, EngineConfig(num_pages=256, page_size=8, kernels="triton", cuda_graphs=graphs))
        outs[graphs] = {k: v[0] for k, v in run_to_completion(engine, requests).items()}
        if graphs:
            assert engine.runner.graphs.num_replays > 0
    assert outs[True] == outs[False]


@pytest.mark.parametrize("decoding", [dict(steps=8), dict(threshold=0.7)])
def test_block_causal_engine_with_graphs_decodes_as_without(decoding):
    """SDAR-style block-causal steps (exact cache) replayed from graphs: the eager path's tokens."""
    pytest.importorskip("triton")
    from dilaserve.engine.random_model import SDAR_TINY, build_model
    from dilaserve.engine.sampling_params import SamplingParams
    from tests.engine.helpers import make_prompts

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(SDAR_TINY, torch.device("cuda"), seed=1, dtype=torch.float32)
    block = model.spec.causal_block_size
    prompts = make_prompts(5, seed=4, lo=3, hi=40)
    params = SamplingParams(max_tokens=8 * block, block_size=block, cache="exact", **decoding)
    assert_graphs_decode_as_eager(model, [(f"r{i}", p, params) for i, p in enumerate(prompts)])

