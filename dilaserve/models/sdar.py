"""SDAR (JetAstra/SDAR-*-Chat): a block-diffusion LM on Qwen3 weights and config.

State-dict keys are Qwen3's: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``
(no bias) with ``self_attn.{q,k}_norm`` (per-head RMSNorm over ``head_dim``, before RoPE),
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``model.norm``, ``lm_head`` (absent when ``tie_word_embeddings``). ``head_dim`` comes from the
config and need not be hidden_size / heads; grouped-query attention as configured.

Attention is bidirectional inside a block of ``config.block_size`` positions (aligned to
absolute position 0) and causal across blocks; the attention backend applies that from
``spec.causal_block_size``. Logits are not shifted.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dilaserve.models.attention import AttentionBackend
from dilaserve.models.base import DiffusionLM
from dilaserve.models.layers import BlockOps, RMSNorm, final_norm, residual_stream, rotary_cos_sin, transformer_block
from dilaserve.models.spec import ModelSpec


class SDARAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)


class SDARMLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)


class SDARLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.self_attn = SDARAttention(spec)
        self.mlp = SDARMLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)


class SDARModel(DiffusionLM):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.is_bidirectional:
            raise ValueError("SDAR is block-causal: spec.causal_block_size must be >= 1")
        self.spec = spec
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.model.layers = nn.ModuleList(SDARLayer(spec) for _ in range(spec.num_layers))
        self.model.norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                ops: BlockOps | None = None) -> torch.Tensor:
        x = residual_stream(self.model.embed_tokens(input_ids), ops)
        rotary = rotary_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta)
        for i, layer in enumerate(self.model.layers):
            a, m = layer.self_attn, layer.mlp
            x = transformer_block(
                x, layer_idx=i, attn_norm=layer.input_layernorm, q_proj=a.q_proj, k_proj=a.k_proj,
                v_proj=a.v_proj, o_proj=a.o_proj, mlp_norm=layer.post_attention_layernorm,
                gate_proj=m.gate_proj, up_proj=m.up_proj, down_proj=m.down_proj,
                rotary=rotary, attn=attn, head_dim=self.spec.head_dim, q_norm=a.q_norm, k_norm=a.k_norm,
                ops=ops,
            )
        return final_norm(x, self.model.norm, ops)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.spec.tie_embeddings else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight())
