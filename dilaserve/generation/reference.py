"""The reference generator: one request at a time, obviously correct, the oracle for tests.

It decodes a canvas of ``gen_length`` masked positions after the prompt in semi-autoregressive
blocks. Each step it computes some positions of the sequence, reads logits for the current
block's masked positions, and lets the unmasking strategy commit some of them:

- cache ``none``: every step is a full forward of prompt + canvas (LLaDA's ``generate``);
- cache ``prefix`` / ``dual`` (Fast-dLLM): the first step of a block is a *refresh* (full
  forward that stores every position's keys and values, and also decodes); later steps
  compute only block + suffix (prefix) or only the block (dual) against the stored keys and
  values. ``refresh_interval`` N adds a refresh on every N-th step of a block.
- cache ``exact`` (block-causal models such as SDAR, whose attention is bidirectional inside a
  block and causal across blocks): the cache of finished blocks is exact, so there is no
  refresh. A step computes the current block against the cached prefix; see below.

The same loop serves every mode; only the set of computed positions changes.

Block-causal models (``spec.causal_block_size`` B > 0) follow JetAstra/SDAR ``generate.py``
(``block_diffusion_generate``):

- blocks are the model's attention blocks, aligned to absolute position 0, so the decoding
  block size must equal B. The prompt's whole blocks are the prefix; its tail (``prompt_len % B``
  tokens) sits, committed, at the start of the first decoded block, and each step computes it
  with that block. The last block ends at ``prompt_len + gen_length`` (the published code pads
  the canvas to a whole block and decodes the padding too; we do not generate past the end).
- ``exact``: a step computes the positions from the first one whose cached keys and values are
  not final up to the current block's end, attending to the cache below and bidirectionally
  within its block. The published code stores a finished block's keys and values by one more
  forward of the block with its committed tokens (``store_kv=True``) before the next block; here
  that recomputation rides on the next block's first step instead (its computed range starts
  at the finished block), and the prompt prefill rides on the first step. Block-causal masking
  makes the two the same function (the finished block's queries see only keys up to its end,
  and every layer writes the new keys before attending), one forward per block cheaper; the
  last block is never stored because nothing reads it.
- ``none``: every step is a full block-causal forward of prompt + canvas.
- fixed steps: ``steps`` is divided by ``ceil(gen_length / B)``; an unaligned prompt adds one
  block, which takes the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dilaserve.errors import InvalidRequestError
from dilaserve.generation.blocks import block_origin, check_block_causal_settings
from dilaserve.generation.unmasking import DREAM_ALGORITHMS, Unmasker, make_unmasker
from dilaserve.models.attention import ContiguousCacheAttention, DenseAttention, new_contiguous_cache
from dilaserve.models.base import DiffusionLM

CACHE_MODES = ("none", "prefix", "dual", "exact")


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int = 128
    block_length: int = 32
    steps: int | None = None  # total over all blocks (fixed steps / Dream); None with a threshold
    threshold: float | None = None
    algorithm: str = "llada"  # or a Dream algorithm
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    cache: str = "none"
    # Within a block, refresh on every step that is a multiple of this (1: every step; 0: only
    # at the block's first step). Ignored with cache "none", where every step is a full forward.
    refresh_interval: int = 0
    seed: int = 0

    @property
    def num_blocks(self) -> int:
        """Blocks the fixed-steps budget is divided over."""
        return -(-self.gen_length // self.block_length)

    def validate(self, prompt_len: int, vocab_size: int, max_positions: int, causal_block_size: int = 0) -> Unmasker:
        """Raises InvalidRequestError with a readable message; returns the unmasking strategy.

        ``causal_block_size``: the model's attention block (0: bidirectional model)."""
        if prompt_len < 1:
            raise InvalidRequestError("the prompt is empty")
        if self.gen_length < 1 or self.block_length < 1:
            raise InvalidRequestError("gen_length and block_length must be >= 1")
        if causal_block_size:
            check_block_causal_settings(causal_block_size, self.block_length, self.cache, self.refresh_interval)
        elif self.cache == "exact":
            raise InvalidRequestError(
                "cache 'exact' is for block-causal models (SDAR); this model is bidirectional: "
                "use 'none', 'prefix' or 'dual'"
            )
        elif self.gen_length % self.block_length:
            raise InvalidRequestError(
                f"gen_length {self.gen_length} is not divisible by block_length {self.block_length}"
            )
        if prompt_len + self.gen_length > max_positions:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + gen_length ({self.gen_length}) exceeds the model's "
                f"maximum of {max_positions} positions"
            )
        if self.cache not in CACHE_MODES:
            raise InvalidRequestError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.refresh_interval < 0:
            raise InvalidRequestError("refresh_interval must be >= 0")
        steps_per_block = None
        if self.steps is not None:
            if self.steps < 1:
                raise InvalidRequestError(f"steps must be >= 1, got {self.steps}")
            if self.steps % self.num_blocks:
                raise InvalidRequestError(
                    f"steps {self.steps} is not divisible by the number of blocks {self.num_blocks}"
                )
            steps_per_block = self.steps // self.num_blocks
        if self.algorithm in DREAM_ALGORITHMS and self.threshold is not None:
            raise InvalidRequestError("Dream algorithms take steps, not a threshold")
        return make_unmasker(
            algorithm=self.algorithm, threshold=self.threshold, steps_per_block=steps_per_block,
            temperature=self.temperature, remasking=self.remasking, top_p=self.top_p,
            top_k=self.top_k, alg_temp=self.alg_temp,
        )


@dataclass
class GenerationResult:
    canvas_ids: list[int]  # all gen_length generated positions
    token_ids: list[int]  # up to (not including) the first end-of-sequence token
    nfe: int  # model forward passes
    steps_per_block: list[int] = field(default_factory=list)


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def truncate_at_eos(canvas: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(canvas):
        if t in stop_ids:
            return canvas[:i]
    return canvas


@torch.no_grad()
def generate(model: DiffusionLM, prompt_ids: list[int], config: GenerationConfig) -> GenerationResult:
    """Decodes one request by the published semantics (see module docstring)."""
    spec = model.spec
    unmasker = config.validate(len(prompt_ids), spec.vocab_size, spec.max_positions, spec.causal_block_size)
    check_prompt_ids(prompt_ids, spec.vocab_size)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(config.seed)

    prompt_len = len(prompt_ids)
    total = prompt_len + config.gen_length
    x = torch.full((total,), spec.mask_token_id, dtype=torch.long, device=device)
    x[:prompt_len] = torch.tensor(prompt_ids, device=device)
    all_positions = torch.arange(total, device=device)
    cache = None if config.cache == "none" else new_contiguous_cache(
        spec.num_layers, 1, total, spec.num_kv_heads, spec.head_dim, dtype, device
    )
    nfe = 0
    steps_per_block = []
    cached_until = 0  # exact cache: positions below hold their final keys and values
    origin = block_origin(prompt_len, spec.causal_block_size)
    for start in range(origin, total, config.block_length):
        end = min(start + config.block_length, total)
        num_masked_at_start = int((x[start:end] == spec.mask_token_id).sum())
        step = 0
        while bool((x[start:end] == spec.mask_token_id).any()):
            interval = config.refresh_interval
            if config.cache == "none":  # plain full forward
                computed = all_positions
                attn = DenseAttention([total], positions=all_positions, causal_block_size=spec.causal_block_size)
            elif config.cache == "exact":
                computed = all_positions[cached_until:end]
                attn = ContiguousCacheAttention(
                    cache, computed.unsqueeze(0), visible_len=end, causal_block_size=spec.causal_block_size
                )
            else:
                if step == 0 or (interval and step % interval == 0):
                    computed = all_positions  # refresh: every position's k, v stored anew
                else:
                    # Dream reads position p's logits from the hidden state at p - 1.
                    first = start - 1 if spec.shift_logits else start
                    computed = all_positions[first:] if config.cache == "prefix" else all_positions[first:end]
                attn = ContiguousCacheAttention(cache, computed.unsqueeze(0), visible_len=total)
            hidden = model(x[computed], computed, attn)
            nfe += 1
            cached_until = start  # everything before this block was computed with committed tokens

            masked = torch.nonzero(x[start:end] == spec.mask_token_id).squeeze(1) + start
            rows = masked - int(computed[0])
            if spec.shift_logits:
                rows = (rows - 1).clamp(min=0)  # position 0 keeps its own logits, as in Dream
            logits = model.compute_logits(hidden[rows]).float()
            # Never predict the mask token itself: committing it would leave the position masked
            # forever (the published loops would spin or end with masks left).
            logits[:, spec.mask_token_id] = -torch.inf
            choice = unmasker.select(logits, step=step, num_masked_in_block=num_masked_at_start, generator=generator)
            x[masked[choice.commit]] = choice.tokens[choice.commit]
            step += 1
        steps_per_block.append(step)

    canvas = x[prompt_len:].tolist()
    return GenerationResult(canvas, truncate_at_eos(canvas, {spec.eos_token_id}), nfe, steps_per_block)
