"""Block-causal models (SDAR) in the engine: the exact cache reproduces the reference token for
token in mixed batches, never refreshes, and bad settings are refused clearly."""

from __future__ import annotations

import itertools

import pytest

from dilaserve.engine.cost_model import request_work
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.errors import InvalidRequestError
from dilaserve.generation.reference import GenerationConfig, generate
from tests.engine.helpers import make_prompts, new_engine, run_to_completion

DECODINGS = [dict(threshold=0.5), dict(threshold=0.8), dict(threshold=0.97), dict(steps=9),
             dict(steps=6, remasking="random"), dict(threshold=0.8, chunk_size=2)]


def _reference_kwargs(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "chunk_size"}


def _expected_and_requests(model, settings_list, prompts, lengths, prefix):
    requests, expected = [], {}
    for i, (s, prompt, n) in enumerate(zip(settings_list, prompts, lengths)):
        rid = f"{prefix}{i}"
        if "chunk_size" in s:  # a chunk smaller than the block is not a reference mode: compare to itself below
            expected[rid] = None
        else:
            ref = generate(model, prompt, GenerationConfig(gen_length=n, block_length=4, seed=i, **_reference_kwargs(s)))
            expected[rid] = ref.token_ids
        requests.append((rid, prompt, SamplingParams(max_tokens=n, block_size=4, seed=i, **s)))
    return requests, expected


def test_mixed_batch_matches_reference(sdar):
    """Exact and uncached requests, thresholds and fixed steps, prompts aligned and not, in one batch."""
    settings = [dict(cache=c, **d) for c, d in itertools.product(("exact", "none"), DECODINGS)]
    prompts = make_prompts(len(settings), seed=13, lo=1, hi=20)
    prompts[0] = prompts[0][:4] if len(prompts[0]) >= 4 else [5, 6, 7, 8]  # a prompt of exactly one block
    lengths = [9 if i % 3 == 0 else 12 if i % 3 == 1 else 17 for i in range(len(settings))]
    requests, expected = _expected_and_requests(sdar, settings, prompts, lengths, "s")
    done = run_to_completion(new_engine(sdar), requests)
    for rid, tokens in expected.items():
        if tokens is not None:
            assert done[rid][0] == tokens, rid
    for rid, (_, _, counters) in done.items():
        assert counters.num_refresh_steps == (0 if rid in {"s%d" % i for i, s in enumerate(settings)
                                                          if s["cache"] == "exact"} else counters.num_steps)


def test_exact_cache_counts_no_refresh_and_one_forward_per_step(sdar):
    prompt = make_prompts(1, seed=2, lo=6, hi=7)[0]  # 6 tokens: the first decoded block holds 2 of them
    ref = generate(sdar, prompt, GenerationConfig(gen_length=12, block_length=4, steps=12, cache="exact"))
    params = SamplingParams(max_tokens=12, block_size=4, steps=12, cache="exact")
    tokens, _, counters = run_to_completion(new_engine(sdar), [("a", prompt, params)])["a"]
    assert tokens == ref.token_ids
    assert len(tokens) == 12 and len(ref.steps_per_block) == 4  # blocks at positions 4, 8, 12, 16
    assert counters.num_steps == ref.nfe == sum(ref.steps_per_block)
    assert counters.num_refresh_steps == 0
    # Blocks [4, 8) (2 masked: 2 steps), [8, 12), [12, 16) (4 steps each), [16, 18) (2 steps). A
    # block's first step also computes what is before it and not final: the prompt prefix (4),
    # then the finished block (4); the last block is 2 positions wide.
    assert ref.steps_per_block == [2, 4, 4, 2]
    assert counters.num_tokens_computed == (8 + 4) + (8 + 3 * 4) + (8 + 3 * 4) + (6 + 2)


def test_chunked_exact_decoding_is_batch_invariant(sdar):
    prompts = make_prompts(12, seed=21)
    params = SamplingParams(max_tokens=12, block_size=4, threshold=0.8, cache="exact", chunk_size=2)
    alone = run_to_completion(new_engine(sdar), [("x", prompts[0], params)])["x"][0]
    many = run_to_completion(new_engine(sdar), [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert alone == many["r0"][0]


def test_staggered_arrivals_match_reference(sdar):
    engine = new_engine(sdar)
    prompts = make_prompts(6, seed=9)
    params = SamplingParams(max_tokens=10, block_size=4, threshold=0.7, cache="exact")
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_work():
        if pending:
            i, p = pending.pop(0)
            engine.add(engine.make_request(f"r{i}", p, params))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        ref = generate(sdar, p, GenerationConfig(gen_length=10, block_length=4, threshold=0.7, cache="exact"))
        assert outputs[f"r{i}"] == ref.token_ids


def test_block_causal_and_bidirectional_replicas_side_by_side(sdar, llada):
    """An SDAR replica and a LLaDA replica of one server, stepped in turn, each match their reference."""
    engines = {"sdar": new_engine(sdar), "llada": new_engine(llada)}
    models = {"sdar": sdar, "llada": llada}
    prompts = make_prompts(8, seed=17)
    expected, outputs = {}, {}
    for i, p in enumerate(prompts):
        name = "sdar" if i % 2 else "llada"
        cache = ("exact" if i % 4 == 1 else "none") if name == "sdar" else ("dual", "prefix")[i % 4 // 2]
        s = dict(threshold=(0.6, 0.9)[i % 3 % 2], cache=cache)
        block = 4 if name == "sdar" else 8
        ref = generate(models[name], p, GenerationConfig(gen_length=16, block_length=block, **s))
        expected[f"{name}{i}"] = ref.token_ids
        engines[name].add(engines[name].make_request(f"{name}{i}", p, SamplingParams(max_tokens=16, block_size=block, **s)))
    while any(e.has_work() for e in engines.values()):
        for engine in engines.values():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert outputs == expected


@pytest.mark.parametrize("params, message", [
    (SamplingParams(max_tokens=8, block_size=4, cache="dual"), "cache must be one of"),
    (SamplingParams(max_tokens=8, block_size=4, cache="prefix"), "block-causal"),
    (SamplingParams(max_tokens=8, block_size=8, cache="exact"), "block size 4"),
    (SamplingParams(max_tokens=8, block_size=4, cache="exact", refresh_interval=1), "refresh_interval"),
])
def test_engine_rejects_bad_settings_for_block_causal_models(sdar, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        new_engine(sdar).make_request("x", [1, 2, 3], params)


def test_engine_rejects_exact_for_bidirectional_models(llada):
    with pytest.raises(InvalidRequestError, match="bidirectional"):
        new_engine(llada).make_request("x", [1, 2, 3], SamplingParams(max_tokens=8, block_size=8, cache="exact"))


def test_exact_cost_has_no_refresh_and_grows_with_context_through_attention_only():
    short, long = (request_work(p + 64, 64, 4, 2.0, "exact") for p in (64, 1024))
    assert short.steps == long.steps == 32
    # Token-forwards differ only by the prompt prefill; attention reads grow with the context.
    assert long.tokens - short.tokens == 1024 - 64
    assert long.context_tokens > short.context_tokens
    dual = request_work(64 + 64, 64, 4, 2.0, "dual")
    assert short.tokens < dual.tokens  # no per-block refresh of the whole sequence
