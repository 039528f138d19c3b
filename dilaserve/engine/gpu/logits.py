"""Greedy LLaDA decisions straight from the LM head (the fused logit budget)."""

from __future__ import annotations

import torch

from kernels.logit_budget import logit_budget


def greedy_choices(hidden_rows: torch.Tensor, lm_head_weight: torch.Tensor, mask_token_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [M] long, confidence [M] float64) for greedy threshold / fixed-steps rows, as
    ``choose_tokens(logits, 0.0, "low_confidence", None)`` returns them, the mask token never
    chosen. Confidence is computed in float32 (cast to float64 for the unmaskers): see
    ``kernels/logit_budget.py`` for how it differs from the torch path's float64 softmax."""
    tokens, prob = logit_budget(hidden_rows.contiguous(), lm_head_weight, mask_token_id)
    return tokens, prob.to(torch.float64)
