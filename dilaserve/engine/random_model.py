"""Models of published shapes with random weights, for speed work.

A step's cost does not depend on the weights (same matrix shapes, same attention extents), so
latency profiles and load benchmarks on GPUs use an LLaDA-8B-shaped model filled with random
weights: no checkpoint is read. The end-of-sequence row of the LM head is zeroed so that no
request stops early (its logit is then 0, never the maximum of the vocabulary's random ones).
"""

from __future__ import annotations

import torch

from dilaserve.models.base import DiffusionLM
from dilaserve.models.checkpoint import llada_config, sdar_config
from dilaserve.models.llada import LLaDAModel
from dilaserve.models.sdar import SDARModel
from dilaserve.models.spec import llada_spec, sdar_spec

LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288, vocab_size=126464,
                mask_token_id=126336, eos_token_id=126081)
TINY = dict(d_model=128, n_layers=2, n_heads=4, mlp_hidden_size=256, vocab_size=512,
            mask_token_id=500, eos_token_id=501)
# Block-diffusion (block-causal) shapes: SDAR-8B-Chat is Qwen3-8B's shape with 4-token blocks.
SDAR_8B = dict(family="sdar", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=12288, vocab_size=151936, mask_token_id=151669,
               eos_token_id=151645, block_size=4)
SDAR_TINY = dict(family="sdar", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=256, vocab_size=512, mask_token_id=500, eos_token_id=501,
                 block_size=4)
SHAPES = {"llada-8b": LLADA_8B, "tiny": TINY, "sdar-8b": SDAR_8B, "sdar-tiny": SDAR_TINY}


def spec_for_shape(shape: dict):
    """The ``ModelSpec`` of a named shape (no weights)."""
    shape = dict(shape)
    if shape.pop("family", "llada") == "sdar":
        return sdar_spec(sdar_config(**shape))
    return llada_spec(llada_config(**shape))


def build_model(shape: dict, device: torch.device, seed: int = 0, dtype: torch.dtype | None = None) -> DiffusionLM:
    """A model of ``shape`` (LLaDA unless its ``family`` is "sdar") on ``device`` with random
    weights (bf16 on CUDA, float32 elsewhere unless ``dtype`` says otherwise)."""
    spec = spec_for_shape(shape)
    model_cls = SDARModel if shape.get("family") == "sdar" else LLaDAModel
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = model_cls(spec)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif "wte" in name or "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
        model.lm_head_weight()[spec.eos_token_id].zero_()  # never the argmax: no early stop
    return model.eval()
