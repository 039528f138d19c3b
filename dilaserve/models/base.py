"""The interface every model family implements."""

from __future__ import annotations

import torch
import torch.nn as nn

from dilaserve.models.attention import AttentionBackend, DenseAttention
from dilaserve.models.spec import ModelSpec


class DiffusionLM(nn.Module):
    """A mask-predicting LM over a packed batch of tokens.

    ``forward(input_ids [N], positions [N], attn)`` returns final hidden states [N, hidden];
    ``compute_logits(hidden)`` applies the LM head only to the rows the caller asks for
    (the logit budget: never the whole sequence unless the caller wants it).
    """

    spec: ModelSpec

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                ops=None) -> torch.Tensor:
        """Hidden states of the packed tokens; ``ops``: fused element-wise kernels (``layers.BlockOps``)."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dense_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full bidirectional forward of a [B, L] batch -> logits [B, L, V], unshifted.

        Used by training and by tests; generation code applies the family's shift itself.
        """
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        attn = DenseAttention([length] * batch, positions=positions, causal_block_size=self.spec.causal_block_size)
        hidden = self(input_ids.reshape(-1), positions, attn)
        return self.compute_logits(hidden).view(batch, length, -1)
