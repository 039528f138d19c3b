"""LLaDA (GSAI-ML/LLaDA-8B-*): a bidirectional LLaMA-style mask predictor.

State-dict keys follow the published checkpoint: ``model.transformer.wte``,
``model.transformer.blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,
up_proj,ff_out}``, ``model.transformer.ln_f``, ``model.transformer.ff_out`` (absent when
``weight_tying``). ``ff_proj`` is the SwiGLU gate, ``up_proj`` the linear branch. Logits are
not shifted.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dilaserve.models.attention import AttentionBackend
from dilaserve.models.base import DiffusionLM
from dilaserve.models.layers import BlockOps, RMSNorm, final_norm, residual_stream, rotary_cos_sin, transformer_block
from dilaserve.models.spec import ModelSpec


class LLaDABlock(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
        self.attn_norm = RMSNorm(d, spec.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, spec.norm_eps)
        self.ff_proj = nn.Linear(d, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, spec.intermediate_size, bias=False)
        self.ff_out = nn.Linear(spec.intermediate_size, d, bias=False)


class LLaDAModel(DiffusionLM):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        transformer = nn.Module()
        transformer.wte = nn.Embedding(spec.vocab_size, spec.hidden_size)
        transformer.blocks = nn.ModuleList(LLaDABlock(spec) for _ in range(spec.num_layers))
        transformer.ln_f = RMSNorm(spec.hidden_size, spec.norm_eps)
        if not spec.tie_embeddings:
            transformer.ff_out = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.model = nn.Module()
        self.model.transformer = transformer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                ops: BlockOps | None = None) -> torch.Tensor:
        t = self.model.transformer
        x = residual_stream(t.wte(input_ids), ops)
        rotary = rotary_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta)
        for i, b in enumerate(t.blocks):
            x = transformer_block(
                x, layer_idx=i, attn_norm=b.attn_norm, q_proj=b.q_proj, k_proj=b.k_proj, v_proj=b.v_proj,
                o_proj=b.attn_out, mlp_norm=b.ff_norm, gate_proj=b.ff_proj, up_proj=b.up_proj,
                down_proj=b.ff_out, rotary=rotary, attn=attn, head_dim=self.spec.head_dim, ops=ops,
            )
        return final_norm(x, t.ln_f, ops)

    def lm_head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t.wte.weight if self.spec.tie_embeddings else t.ff_out.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight())
