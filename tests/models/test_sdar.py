"""SDAR: the published checkpoint format loads, attention is block-causal, generation runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dilaserve.errors import CheckpointError, InvalidRequestError
from dilaserve.generation.reference import GenerationConfig, generate
from dilaserve.models.attention import DenseAttention
from dilaserve.models.checkpoint import make_random_checkpoint
from dilaserve.models.registry import load_model, read_spec
from tests.engine.helpers import make_prompts

SDAR_KEYS = [
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    *(f"model.layers.1.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
    *(f"model.layers.1.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")),
    "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
]


def test_published_format_and_spec(sdar_dir):
    state = load_file(str(sdar_dir / "model.safetensors"))
    assert set(SDAR_KEYS) <= set(state)
    assert not any(k.endswith(".bias") for k in state)
    config = json.loads((sdar_dir / "config.json").read_text())
    assert config["model_type"] == "sdar" and config["architectures"] == ["SDARForCausalLM"]
    spec = read_spec(sdar_dir)
    assert spec.causal_block_size == config["block_size"] == 4
    assert spec.mask_token_id == config["mask_token_id"] and not spec.shift_logits and spec.qk_norm
    # Qwen3's explicit head_dim (24) differs from hidden / heads (16); GQA 4 over 2.
    assert spec.head_dim == 24 and state["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 64)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 24, 64)
    assert state["model.layers.0.self_attn.q_norm.weight"].shape == (24,)


def test_tied_embeddings_load_without_lm_head(tmp_path):
    d = make_random_checkpoint(tmp_path, "sdar", seed=5)
    config = json.loads((d / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(config))
    model = load_model(d)  # lm_head in the file is ignored (with a warning), the embedding reused
    assert model.lm_head_weight() is model.model.embed_tokens.weight


@pytest.mark.parametrize("change, message", [
    ({"block_size": None}, "block_size"),
    ({"mask_token_id": None}, "mask_token_id"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "sliding-window"),
])
def test_unsupported_configs_are_named(tmp_path, sdar_dir, change, message):
    copy = tmp_path / "m"
    shutil.copytree(sdar_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(copy)


def test_a_token_does_not_see_later_blocks(sdar):
    """Changing block 2 leaves blocks 0-1 unchanged; changing a later token of the same block
    changes an earlier one (bidirectional within a block)."""
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    base = sdar.dense_logits(ids)
    later = ids.clone()
    later[0, 8:] = (later[0, 8:] + 1) % 250
    assert torch.equal(sdar.dense_logits(later)[0, :8], base[0, :8])
    same_block = ids.clone()
    same_block[0, 7] = (same_block[0, 7] + 1) % 250
    assert not torch.allclose(sdar.dense_logits(same_block)[0, 4], base[0, 4])
    assert torch.equal(sdar.dense_logits(same_block)[0, :4], base[0, :4])


def test_packed_sequences_keep_their_own_blocks(sdar):
    """Two sequences packed in one forward give what each gives alone."""
    a, b = make_prompts(2, seed=3, lo=9, hi=15)
    ids = torch.tensor(a + b)
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
    packed = sdar(ids, pos, DenseAttention([len(a), len(b)], positions=pos, causal_block_size=4))
    alone = sdar(torch.tensor(a), torch.arange(len(a)), DenseAttention([len(a)], torch.arange(len(a)), 4))
    torch.testing.assert_close(packed[: len(a)], alone)


@pytest.mark.parametrize("decoding", [dict(threshold=0.6), dict(threshold=0.95), dict(steps=12)])
def test_exact_cache_reproduces_uncached_decoding(sdar, decoding):
    """The exact cache is exact: same tokens and forwards as full block-causal forwards."""
    for prompt in make_prompts(5, seed=8):
        kw = dict(gen_length=11, block_length=4, **decoding)
        exact = generate(sdar, prompt, GenerationConfig(cache="exact", **kw))
        full = generate(sdar, prompt, GenerationConfig(cache="none", **kw))
        assert exact.canvas_ids == full.canvas_ids and exact.nfe == full.nfe
        assert mask_free(exact.canvas_ids, sdar.spec.mask_token_id) and len(exact.canvas_ids) == 11
        # Blocks align to position 0: the prompt's tail shares the first decoded block.
        origin = len(prompt) // 4 * 4
        assert len(exact.steps_per_block) == -(-(len(prompt) + 11 - origin) // 4)


def mask_free(ids, mask_id):
    return mask_id not in ids


@pytest.mark.parametrize("settings, message", [
    (dict(cache="dual"), "block-causal"),
    (dict(cache="prefix"), "block-causal"),
    (dict(block_length=8), "block size 4"),
    (dict(cache="exact", refresh_interval=2), "refresh_interval"),
])
def test_reference_rejects_bad_settings(sdar, settings, message):
    config = GenerationConfig(**{"gen_length": 8, "block_length": 4, "threshold": 0.9, "cache": "exact", **settings})
    with pytest.raises(InvalidRequestError, match=message):
        generate(sdar, [1, 2, 3], config)


def test_bidirectional_models_reject_exact(llada):
    with pytest.raises(InvalidRequestError, match="block-causal"):
        generate(llada, [1, 2, 3], GenerationConfig(gen_length=8, block_length=4, threshold=0.9, cache="exact"))
