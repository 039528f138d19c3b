"""What the engine needs to know about a model, read once from its published config.json.

Each model family keeps its own field names on disk (LLaDA: ``d_model``, ``n_layers``...;
Dream: Qwen2's ``hidden_size``, ``num_hidden_layers``...). ``ModelSpec`` is the one plain,
family-independent description the rest of the code uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dilaserve.errors import CheckpointError


@dataclass(frozen=True)
class ModelSpec:
    """Shape and token facts of one diffusion LM (all sizes in elements or tokens)."""

    model_type: str
    vocab_size: int  # rows of the embedding / LM head (LLaDA: embedding_size)
    hidden_size: int
    intermediate_size: int  # SwiGLU hidden width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    norm_eps: float
    max_positions: int  # longest sequence (prompt + generation) in tokens
    mask_token_id: int
    eos_token_id: int
    # Dream predicts position i from the hidden state at i - 1 ("shifted" logits).
    shift_logits: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    # Block-causal models (SDAR) attend causally across blocks of this many tokens; 0 = fully
    # bidirectional (LLaDA, Dream).
    causal_block_size: int = 0
    # Qwen3 / SDAR normalise each head's queries and keys (RMSNorm over head_dim) before RoPE.
    qk_norm: bool = False
    # Width of one attention head when the config states it (Qwen3: ``head_dim``); 0 derives it
    # as hidden_size // num_heads.
    explicit_head_dim: int = 0

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def is_bidirectional(self) -> bool:
        return self.causal_block_size == 0

    def num_params(self) -> int:
        """Parameter count (weights only), used for FLOP and byte estimates."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * q * 2 + 2 * d * kv + 3 * d * f + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        head = 0 if self.tie_embeddings else v * d
        return self.num_layers * per_layer + v * d + head + d


def _require(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: config.json has no field {key!r}")
    return config[key]


def llada_spec(config: Mapping[str, Any], where: str = "config.json") -> ModelSpec:
    """Reads LLaDA's own config fields (``d_model``, ``n_layers``, ``mlp_hidden_size``...)."""
    d_model = int(_require(config, "d_model", where))
    n_heads = int(_require(config, "n_heads", where))
    n_kv_heads = config.get("n_kv_heads") or n_heads
    if config.get("multi_query_attention"):
        n_kv_heads = 1
    hidden = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d_model
    if config.get("block_type", "llama") != "llama":
        raise CheckpointError(f"{where}: only block_type 'llama' is supported, got {config['block_type']!r}")
    if config.get("layer_norm_type", "rms") != "rms":
        raise CheckpointError(f"{where}: only layer_norm_type 'rms' is supported")
    if config.get("alibi") or not config.get("rope", True):
        raise CheckpointError(f"{where}: only rotary position embeddings are supported")
    if config.get("include_bias") or config.get("include_qkv_bias"):
        raise CheckpointError(f"{where}: linear biases are not supported for LLaDA")
    if config.get("attention_layer_norm"):
        raise CheckpointError(f"{where}: attention_layer_norm (QK-norm) is not supported for LLaDA")
    if config.get("scale_logits"):
        raise CheckpointError(f"{where}: scale_logits is not supported")
    return ModelSpec(
        model_type="llada",
        vocab_size=int(config.get("embedding_size") or _require(config, "vocab_size", where)),
        hidden_size=d_model,
        intermediate_size=int(hidden),
        num_layers=int(_require(config, "n_layers", where)),
        num_heads=n_heads,
        num_kv_heads=int(n_kv_heads),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        max_positions=int(config.get("max_sequence_length", 4096)),
        mask_token_id=int(_require(config, "mask_token_id", where)),
        eos_token_id=int(_require(config, "eos_token_id", where)),
        shift_logits=False,
        qkv_bias=False,
        tie_embeddings=bool(config.get("weight_tying", False)),
    )


def dream_spec(config: Mapping[str, Any], where: str = "config.json") -> ModelSpec:
    """Reads Dream's Qwen2-style config fields."""
    hidden = int(_require(config, "hidden_size", where))
    n_heads = int(_require(config, "num_attention_heads", where))
    return ModelSpec(
        model_type="Dream",
        vocab_size=int(_require(config, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", where)),
        num_layers=int(_require(config, "num_hidden_layers", where)),
        num_heads=n_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 32768)),
        mask_token_id=int(_require(config, "mask_token_id", where)),
        eos_token_id=int(_require(config, "eos_token_id", where)),
        shift_logits=True,
        qkv_bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def sdar_spec(config: Mapping[str, Any], where: str = "config.json") -> ModelSpec:
    """Reads SDAR's Qwen3-style config (JetAstra/SDAR ``config.json``): Qwen3 fields plus
    ``block_size`` (the block-diffusion block, attention is block-causal across it) and
    ``mask_token_id``. Logits are not shifted: SDAR predicts each masked position from its own
    hidden state (its training loss and ``block_diffusion_generate`` read logits in place)."""
    hidden = int(_require(config, "hidden_size", where))
    n_heads = int(_require(config, "num_attention_heads", where))
    block_size = int(_require(config, "block_size", where))
    if block_size < 1:
        raise CheckpointError(f"{where}: block_size must be >= 1, got {block_size}")
    if config.get("attention_bias"):
        raise CheckpointError(f"{where}: attention_bias is not supported for SDAR")
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{where}: sliding-window attention is not supported for SDAR")
    if config.get("rope_scaling"):
        raise CheckpointError(f"{where}: rope_scaling is not supported for SDAR")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: only hidden_act 'silu' is supported, got {config['hidden_act']!r}")
    eos = _require(config, "eos_token_id", where)
    return ModelSpec(
        model_type="sdar",
        vocab_size=int(_require(config, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", where)),
        num_layers=int(_require(config, "num_hidden_layers", where)),
        num_heads=n_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        rope_theta=float(config.get("rope_theta", 1000000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 32768)),
        mask_token_id=int(_require(config, "mask_token_id", where)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        shift_logits=False,
        qkv_bias=False,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        causal_block_size=block_size,
        qk_norm=True,
        explicit_head_dim=int(config.get("head_dim") or hidden // n_heads),
    )
