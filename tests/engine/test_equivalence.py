"""The engine decodes exactly as the reference generator, whatever else is in the batch."""

from __future__ import annotations

import itertools

import pytest

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.generation.reference import GenerationConfig, generate
from tests.engine.helpers import make_prompts, new_engine, run_to_completion

DECODINGS = [dict(threshold=0.7), dict(threshold=0.95), dict(steps=8), dict(steps=16, remasking="random")]
CACHES = ["none", "prefix", "dual"]


def _settings(model_name):
    algos = [dict(algorithm=a, steps=8) for a in ("maskgit_plus", "topk_margin", "entropy")] if model_name == "dream" else []
    return [dict(cache=c, **d) for c, d in itertools.product(CACHES, DECODINGS + algos)]


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_mixed_batch_matches_reference(model_name, request):
    """Every cache mode x unmasking strategy, different prompt lengths, all in one batch."""
    model = request.getfixturevalue(model_name)
    settings = _settings(model_name)
    prompts = make_prompts(len(settings), seed=11)
    requests, expected = [], {}
    for i, (s, prompt) in enumerate(zip(settings, prompts)):
        gen_length = 16 if i % 2 else 32
        ref = generate(model, prompt, GenerationConfig(gen_length=gen_length, block_length=8, seed=i, **s))
        expected[f"r{i}"] = ref.token_ids
        requests.append((f"r{i}", prompt, SamplingParams(max_tokens=gen_length, block_size=8, seed=i, **s)))
    done = run_to_completion(new_engine(model), requests)
    assert {rid: d[0] for rid, d in done.items()} == expected


def test_block_size_chunk_reproduces_fast_dllm_dual_and_prefix(llada):
    """c = block_size with a threshold is Fast-dLLM's dual / prefix cache decoding."""
    prompts = make_prompts(6, seed=5)
    for cache in ("dual", "prefix"):
        cfg = GenerationConfig(gen_length=32, block_length=16, threshold=0.8, cache=cache)
        params = SamplingParams(max_tokens=32, block_size=16, threshold=0.8, cache=cache, chunk_size=16)
        done = run_to_completion(new_engine(llada), [(f"p{i}", p, params) for i, p in enumerate(prompts)])
        for i, p in enumerate(prompts):
            ref = generate(llada, p, cfg)
            tokens, _, counters = done[f"p{i}"]
            assert tokens == ref.token_ids
            if len(ref.token_ids) == 32:  # no early end of sequence: same number of forwards
                assert counters.num_steps == ref.nfe


@pytest.mark.parametrize("cache", CACHES)
def test_batch_invariance_1_2_32(llada, cache):
    prompts = make_prompts(32, seed=21)
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.75, cache=cache)
    alone = run_to_completion(new_engine(llada), [("x", prompts[0], params)])["x"][0]
    pair = run_to_completion(new_engine(llada), [("x", prompts[0], params), ("y", prompts[1], params)])["x"][0]
    many = run_to_completion(new_engine(llada), [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert alone == pair == many["r0"][0]


def test_arrival_order_does_not_change_outputs(llada):
    prompts = make_prompts(10, seed=4)
    params = [SamplingParams(max_tokens=16, block_size=8, threshold=t, cache=c)
              for t, c in zip([0.6, 0.9] * 5, CACHES * 4)]
    forward = run_to_completion(new_engine(llada), [(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))])
    backward = run_to_completion(
        new_engine(llada), [(f"r{i}", p, s) for i, (p, s) in reversed(list(enumerate(zip(prompts, params))))]
    )
    assert {k: v[0] for k, v in forward.items()} == {k: v[0] for k, v in backward.items()}


def test_staggered_arrivals_match_reference(llada):
    """Requests joining a running batch mid-way decode as if alone."""
    engine = new_engine(llada)
    prompts = make_prompts(8, seed=9)
    params = SamplingParams(max_tokens=24, block_size=8, threshold=0.8, cache="dual")
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_work():
        if pending:
            i, p = pending.pop(0)
            engine.add(engine.make_request(f"r{i}", p, params))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        ref = generate(llada, p, GenerationConfig(gen_length=24, block_length=8, threshold=0.8, cache="dual"))
        assert outputs[f"r{i}"] == ref.token_ids


def test_sampling_is_batch_invariant_with_seed(llada):
    prompts = make_prompts(4, seed=2)
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.8, temperature=1.0, seed=123)
    alone = run_to_completion(new_engine(llada), [("a", prompts[0], params)])["a"][0]
    batch = run_to_completion(new_engine(llada), [("a", prompts[0], params), ("b", prompts[1], params)])["a"][0]
    assert alone == batch
