"""Writing checkpoints in the published formats: the project's trained model, tests' tiny
random models, and the LLaDA-8B-shaped random model of the GPU benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dilaserve.models.base import DiffusionLM
from dilaserve.models.registry import FAMILIES, build_model
from dilaserve.models.tokenizer import EOS_TOKEN, MASK_TOKEN, build_byte_tokenizer, save_tokenizer


def llada_config(
    *, d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, vocab_size: int,
    mask_token_id: int, eos_token_id: int, n_kv_heads: int | None = None,
    max_sequence_length: int = 4096, rope_theta: float = 500000.0, weight_tying: bool = False,
) -> dict[str, Any]:
    """A config.json with LLaDA-8B-Instruct's field names and its fixed architecture choices."""
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "activation_type": "silu", "alibi": False, "block_type": "llama", "rope": True,
        "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads or n_heads,
        "mlp_hidden_size": mlp_hidden_size, "mlp_ratio": 4, "embedding_size": vocab_size,
        "vocab_size": vocab_size, "max_sequence_length": max_sequence_length, "rope_theta": rope_theta,
        "rope_full_precision": True, "layer_norm_type": "rms", "rms_norm_eps": 1e-5,
        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "include_bias": False,
        "include_qkv_bias": False, "attention_layer_norm": False, "weight_tying": weight_tying,
        "scale_logits": False, "mask_token_id": mask_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id, "use_cache": False,
    }


def dream_config(
    *, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
    intermediate_size: int, vocab_size: int, mask_token_id: int, eos_token_id: int,
    max_position_embeddings: int = 4096, rope_theta: float = 1000000.0, tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A config.json with Dream-v0's (Qwen2's) field names."""
    return {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size, "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings, "rope_theta": rope_theta, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie_word_embeddings, "mask_token_id": mask_token_id,
        "eos_token_id": eos_token_id, "pad_token_id": eos_token_id, "bos_token_id": eos_token_id,
        "attention_dropout": 0.0, "use_sliding_window": False,
    }


def sdar_config(
    *, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
    intermediate_size: int, vocab_size: int, mask_token_id: int, eos_token_id: int, block_size: int = 4,
    head_dim: int | None = None, max_position_embeddings: int = 32768, rope_theta: float = 1000000.0,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A config.json with SDAR's field names: Qwen3's (explicit ``head_dim``, QK-norm implied)
    plus ``block_size`` and ``mask_token_id`` (JetAstra/SDAR-*-Chat)."""
    return {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_act": "silu",
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim or hidden_size // num_attention_heads, "intermediate_size": intermediate_size,
        "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings,
        "rope_theta": rope_theta, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie_word_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": num_hidden_layers,
        "block_size": block_size, "mask_token_id": mask_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id, "bos_token_id": eos_token_id, "fuse_cross_entropy": False,
        "use_cache": True,
    }


def save_checkpoint(model: DiffusionLM, config: dict[str, Any], directory: str | Path) -> Path:
    """config.json + model.safetensors, with the family's published weight names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def random_init_(model: DiffusionLM, seed: int, logit_scale: float = 8.0) -> DiffusionLM:
    """Random weights whose predictions are confident enough to exercise thresholds.

    Default init gives near-uniform logits on tiny models (every confidence ~1/vocab), which
    makes threshold decoding degenerate; scaling the LM head spreads the confidences.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen)) if "norm" in name or "ln_f" in name \
                    else p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "wte" in name or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        head = model.lm_head_weight()
        if not model.spec.tie_embeddings:
            head.mul_(logit_scale)
    return model


def make_random_checkpoint(
    directory: str | Path, family: str = "llada", *, seed: int = 0, hidden_size: int = 64,
    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int | None = None, intermediate_size: int = 128,
    vocab_size: int = 320, max_positions: int = 1024, with_tokenizer: bool = True,
    block_size: int = 4, head_dim: int | None = None,
) -> Path:
    """A tiny random model in the family's published format, with a byte-level tokenizer.

    The mask and end-of-sequence ids are the tokenizer's; ``vocab_size`` may exceed the
    tokenizer (as in LLaDA, whose embedding has unused rows). ``block_size`` and ``head_dim``
    apply to SDAR only (its block-diffusion block and explicit head width).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_byte_tokenizer()
    ids = save_tokenizer(tok, directory) if with_tokenizer else {
        name: tok.token_to_id(name) for name in (EOS_TOKEN, MASK_TOKEN)
    }
    mask_id, eos_id = ids[MASK_TOKEN], ids[EOS_TOKEN]
    if vocab_size <= max(mask_id, eos_id):
        raise ValueError(f"vocab_size {vocab_size} must exceed the tokenizer's ids ({tok.get_vocab_size()})")
    if family == "llada":
        config = llada_config(
            d_model=hidden_size, n_layers=num_layers, n_heads=num_heads, n_kv_heads=num_kv_heads,
            mlp_hidden_size=intermediate_size, vocab_size=vocab_size, mask_token_id=mask_id,
            eos_token_id=eos_id, max_sequence_length=max_positions,
        )
    elif family == "dream":
        config = dream_config(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads, intermediate_size=intermediate_size,
            vocab_size=vocab_size, mask_token_id=mask_id, eos_token_id=eos_id,
            max_position_embeddings=max_positions,
        )
    elif family == "sdar":
        config = sdar_config(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads, intermediate_size=intermediate_size,
            vocab_size=vocab_size, mask_token_id=mask_id, eos_token_id=eos_id, block_size=block_size,
            head_dim=head_dim, max_position_embeddings=max_positions,
        )
    else:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family].read_spec(config, "generated config")
    model = random_init_(build_model(spec), seed)
    return save_checkpoint(model, config, directory)
