"""Loading published-format checkpoints, and the forward pass's invariants."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dilaserve.errors import CheckpointError
from dilaserve.models.attention import ContiguousCacheAttention, DenseAttention, new_contiguous_cache
from dilaserve.models.registry import load_model, read_spec

LLADA_KEYS = [
    "model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
    *(f"model.transformer.blocks.0.{n}.weight" for n in
      ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")),
]
DREAM_KEYS = [
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
]


def test_published_weight_names(llada_dir, dream_dir):
    assert set(LLADA_KEYS) <= set(load_file(str(llada_dir / "model.safetensors")))
    assert set(DREAM_KEYS) <= set(load_file(str(dream_dir / "model.safetensors")))
    config = json.loads((llada_dir / "config.json").read_text())
    assert config["model_type"] == "llada" and {"d_model", "n_layers", "n_heads", "mlp_hidden_size"} <= set(config)
    assert read_spec(dream_dir).shift_logits and not read_spec(llada_dir).shift_logits


@pytest.fixture
def broken(tmp_path, llada_dir):
    copy = tmp_path / "m"
    shutil.copytree(llada_dir, copy)
    return copy


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("/nonexistent/model")


def test_unknown_model_type(broken):
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not a supported"):
        load_model(broken)


def test_unreadable_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(broken)


def test_missing_weight_names_key(broken):
    state = load_file(str(broken / "model.safetensors"))
    del state["model.transformer.blocks.1.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.1.up_proj.weight.*missing"):
        load_model(broken)


def test_wrong_shape_names_key(broken):
    state = load_file(str(broken / "model.safetensors"))
    state["model.transformer.ln_f.weight"] = torch.ones(7)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"ln_f.weight.*\(7,\).*expected"):
        load_model(broken)


def test_corrupt_safetensors_names_file(broken):
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(broken)


def test_pickle_weights_refused(broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle weights are not loaded"):
        load_model(broken)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_packed_batch_equals_each_sequence_alone(family, llada, dream):
    model = llada if family == "llada" else dream
    gen = torch.Generator().manual_seed(0)
    lens = [5, 11, 3]
    seqs = [torch.randint(0, 250, (n,), generator=gen) for n in lens]
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        packed = model(ids, positions, DenseAttention(lens))
        alone = torch.cat([model(s, torch.arange(len(s)), DenseAttention([len(s)])) for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cache_refresh_then_reuse_matches_full_forward(family, llada, dream):
    """A refresh fills the cache; a reuse step on unchanged tokens reproduces the full forward."""
    model = llada if family == "llada" else dream
    spec = model.spec
    ids = torch.randint(0, 250, (17,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(17)
    with torch.no_grad():
        full = model(ids, pos, DenseAttention([17]))
        cache = new_contiguous_cache(spec.num_layers, 1, 17, spec.num_kv_heads, spec.head_dim, torch.float32, "cpu")
        refreshed = model(ids, pos, ContiguousCacheAttention(cache, pos.unsqueeze(0), 17))
        window = pos[6:10]
        reused = model(ids[window], window, ContiguousCacheAttention(cache, window.unsqueeze(0), 17))
    torch.testing.assert_close(refreshed, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reused, full[6:10], rtol=1e-5, atol=1e-5)
