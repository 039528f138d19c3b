"""Invariants of the reference generator (the oracle the engine is tested against)."""

from __future__ import annotations

import pytest
import torch

from dilaserve.errors import InvalidRequestError
from dilaserve.generation.names import fixed_schedule
from dilaserve.generation.reference import GenerationConfig, generate

PROMPTS = [[5, 9, 40, 41, 42], [100, 3, 77, 12, 12, 13, 90, 8, 1]]


def test_llada_schedule_matches_published_rule():
    assert fixed_schedule(10, 4) == [3, 3, 2, 2]
    assert fixed_schedule(8, 8) == [1] * 8
    assert fixed_schedule(3, 5) == [1, 1, 1, 0, 0]
    assert sum(fixed_schedule(31, 7)) == 31


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_fixed_steps_take_exactly_steps_forwards(llada, cache):
    cfg = GenerationConfig(gen_length=24, block_length=8, steps=12, cache=cache)
    result = generate(llada, PROMPTS[0], cfg)
    assert result.nfe == 12 and result.steps_per_block == [4, 4, 4]
    assert len(result.canvas_ids) == 24 and llada.spec.mask_token_id not in result.canvas_ids


@pytest.mark.parametrize("model_name", ["llada", "dream"])
def test_threshold_one_equals_one_token_per_step(model_name, request):
    model = request.getfixturevalue(model_name)
    for prompt in PROMPTS:
        by_threshold = generate(model, prompt, GenerationConfig(gen_length=16, block_length=8, threshold=1.0))
        by_steps = generate(model, prompt, GenerationConfig(gen_length=16, block_length=8, steps=16))
        assert by_threshold.canvas_ids == by_steps.canvas_ids
        assert by_threshold.nfe == by_steps.nfe == 16


def test_lower_threshold_decides_more_per_step(llada):
    strict = generate(llada, PROMPTS[1], GenerationConfig(gen_length=32, block_length=16, threshold=0.99))
    loose = generate(llada, PROMPTS[1], GenerationConfig(gen_length=32, block_length=16, threshold=0.3))
    assert loose.nfe < strict.nfe


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_greedy_is_deterministic(llada, cache):
    cfg = GenerationConfig(gen_length=16, block_length=8, threshold=0.7, cache=cache)
    assert generate(llada, PROMPTS[1], cfg) == generate(llada, PROMPTS[1], cfg)


def test_sampling_is_seeded(llada):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, seed=7)
    a, b = generate(llada, PROMPTS[0], cfg), generate(llada, PROMPTS[0], cfg)
    other = generate(llada, PROMPTS[0], GenerationConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, seed=8))
    assert a.canvas_ids == b.canvas_ids and a.canvas_ids != other.canvas_ids


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("decoding", [dict(threshold=0.6), dict(steps=8)])
def test_cache_with_refresh_every_step_reproduces_uncached(model_name, cache, decoding, request):
    model = request.getfixturevalue(model_name)
    for prompt in PROMPTS:
        plain = generate(model, prompt, GenerationConfig(gen_length=16, block_length=8, **decoding))
        cached = generate(model, prompt, GenerationConfig(gen_length=16, block_length=8, cache=cache, refresh_interval=1, **decoding))
        assert cached.canvas_ids == plain.canvas_ids and cached.nfe == plain.nfe


def test_approximate_cache_changes_computation_not_shape(llada):
    """Without refreshes the cache is approximate: outputs may differ, but decoding completes."""
    for cache in ("prefix", "dual"):
        result = generate(llada, PROMPTS[1], GenerationConfig(gen_length=32, block_length=8, threshold=0.8, cache=cache))
        assert len(result.canvas_ids) == 32 and llada.spec.mask_token_id not in result.canvas_ids


@pytest.mark.parametrize("algorithm", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_algorithms_finish_in_their_steps(dream, algorithm):
    result = generate(dream, PROMPTS[0], GenerationConfig(gen_length=16, block_length=16, steps=8, algorithm=algorithm))
    assert result.nfe <= 8 and dream.spec.mask_token_id not in result.canvas_ids


def test_eos_truncates_token_ids(llada):
    result = generate(llada, PROMPTS[0], GenerationConfig(gen_length=16, block_length=8, steps=16))
    eos = llada.spec.eos_token_id
    expected = result.canvas_ids[: result.canvas_ids.index(eos)] if eos in result.canvas_ids else result.canvas_ids
    assert result.token_ids == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gen_length=30, block_length=8, steps=4), "not divisible by block_length"),
        (dict(gen_length=32, block_length=8, steps=6), "not divisible by the number of blocks"),
        (dict(gen_length=16, block_length=8, threshold=-0.5), "threshold must be in"),
        (dict(gen_length=16, block_length=8, threshold=1.5), "threshold must be in"),
        (dict(gen_length=16, block_length=8), "threshold or a number of steps"),
        (dict(gen_length=16, block_length=8, steps=2, cache="paged"), "cache must be one of"),
        (dict(gen_length=16, block_length=8, steps=2, algorithm="beam"), "unknown unmasking algorithm"),
        (dict(gen_length=2000, block_length=8, steps=250), "exceeds the model's maximum"),
    ],
)
def test_bad_settings_are_clear_errors(llada, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        generate(llada, PROMPTS[0], GenerationConfig(**kwargs))


def test_bad_prompts_are_clear_errors(llada):
    with pytest.raises(InvalidRequestError, match="empty"):
        generate(llada, [], GenerationConfig(gen_length=8, block_length=8, steps=8))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        generate(llada, [1, 10_000], GenerationConfig(gen_length=8, block_length=8, steps=8))
