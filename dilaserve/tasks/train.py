"""Supervised fine-tuning data and loss for LLaDA's masked-diffusion objective.

One training sequence is a chat-formatted user turn (the prompt, never masked) followed by
the assistant's response: the worked solution, then end-of-sequence tokens up to a fixed
response length, as LLaDA's SFT pads, so the model learns to fill trailing positions with
EOS. Each sequence draws ``t ~ U(eps, 1]`` and masks each response token with probability
``t``; the loss is the cross-entropy on masked positions weighted by ``1 / t``, divided by
the response length of its sequence and averaged over the batch (LLaDA's SFT
normalisation). Sequences are packed (no padding tokens); the LM head runs only on masked
rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dilaserve.models.attention import DenseAttention
from dilaserve.models.base import DiffusionLM
from dilaserve.tasks.arithmetic import FILLER_SENTENCES, ArithmeticTask, Example, format_shot, join_prompt
from dilaserve.tasks.tokens import ChatEncoder


class TrainStream:
    """Training batches as a pure function of (seed, step).

    Batch ``step`` is drawn from its own ``random.Random``, so a resumed run needs only the
    step number, and data-loading workers can build batches in any order. In few-shot
    batches each problem is preceded by 1..``fewshot_max`` solved train-split problems and a
    little filler, the shape ``ArithmeticTask.pad_prompt`` gives replayed prompts, so the
    model learns to answer the last question of a long prompt.
    """

    def __init__(
        self, task: ArithmeticTask, seed: int, fewshot_prob: float = 0.0, fewshot_max: int = 0,
        response_lengths: Sequence[int] = (64,),
    ):
        self.task = task
        self.seed = seed
        self.fewshot_prob = fewshot_prob
        self.fewshot_max = fewshot_max
        self.response_lengths = list(response_lengths)

    def batch(self, step: int, num: int) -> tuple[list[tuple[str, str]], int]:
        """(user text, solution) pairs and the batch's response length (tokens).

        A few-shot batch (probability ``fewshot_prob``) holds a quarter as many sequences,
        each several times longer, so that long and short prompts do not share a batch and
        short ones are not padded to the longest inside attention.
        """
        rng = random.Random(f"{self.task.name}/train/{self.seed}/{step}")
        is_fewshot = self.fewshot_max > 0 and rng.random() < self.fewshot_prob
        pairs = []
        for _ in range(max(1, num // 4) if is_fewshot else num):
            example = self._train_example(rng)
            user_text = example.prompt
            if is_fewshot:
                preamble = [format_shot(self._train_example(rng)) for _ in range(rng.randint(1, self.fewshot_max))]
                preamble += [rng.choice(FILLER_SENTENCES) for _ in range(rng.randint(0, 3))]
                user_text = join_prompt(preamble, example.prompt)
            pairs.append((user_text, example.solution))
        return pairs, rng.choice(self.response_lengths)

    def _train_example(self, rng: random.Random) -> Example:
        while True:
            example = self.task.make_example(rng)
            if self.task.split_of(example) == "train":
                return example


@dataclass
class PackedBatch:
    """Clean token ids of a packed batch; ``is_response`` marks positions that may be masked."""

    input_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long, 0.. within each sequence
    seq_index: torch.Tensor  # [N] long, which sequence a token belongs to
    is_response: torch.Tensor  # [N] bool
    seq_lens: list[int]
    response_length: int  # tokens per response, EOS padding included

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True), self.positions.to(device, non_blocking=True),
            self.seq_index.to(device, non_blocking=True), self.is_response.to(device, non_blocking=True),
            self.seq_lens, self.response_length,
        )


def pack_batch(encoder: ChatEncoder, pairs: Sequence[tuple[str, str]], response_length: int) -> PackedBatch:
    """Tokenises (user text, solution) pairs on the CPU; a solution longer than the response is cut."""
    prompts = encoder.prompt_ids([u for u, _ in pairs])
    solutions = encoder.text_ids([s for _, s in pairs])
    padding = [encoder.eos_id] * response_length
    flat = np.fromiter(
        chain.from_iterable(chain(p, (s + padding)[:response_length]) for p, s in zip(prompts, solutions)),
        dtype=np.int64,
    )
    prompt_lens = torch.tensor([len(p) for p in prompts])
    lens = prompt_lens + response_length
    starts = torch.cumsum(lens, 0) - lens
    seq_index = torch.repeat_interleave(torch.arange(len(pairs)), lens)
    positions = torch.arange(int(lens.sum())) - starts[seq_index]
    return PackedBatch(
        input_ids=torch.from_numpy(flat),
        positions=positions,
        seq_index=seq_index,
        is_response=positions >= prompt_lens[seq_index],
        seq_lens=lens.tolist(),
        response_length=response_length,
    )


def sample_noise(
    batch: PackedBatch, generator: torch.Generator, eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens to mask ([N] bool, response tokens only) and each token's mask probability t."""
    device = batch.input_ids.device
    t = (1 - eps) * torch.rand(batch.num_seqs, device=device, generator=generator) + eps
    p_mask = t[batch.seq_index]
    draw = torch.rand(batch.input_ids.shape, device=device, generator=generator)
    return batch.is_response & (draw < p_mask), p_mask


def masked_diffusion_loss(
    model: DiffusionLM, batch: PackedBatch, mask_id: int, generator: torch.Generator, eps: float = 1e-3,
) -> torch.Tensor:
    """LLaDA's SFT loss on one packed batch (a scalar; ``generator`` lives on the batch's device)."""
    is_masked, p_mask = sample_noise(batch, generator, eps)
    noisy = torch.where(is_masked, torch.full_like(batch.input_ids, mask_id), batch.input_ids)
    attn = DenseAttention(batch.seq_lens, positions=batch.positions)
    hidden = model(noisy, batch.positions, attn)
    rows = is_masked.nonzero(as_tuple=True)[0]
    logits = model.compute_logits(hidden[rows]).float()
    token_loss = F.cross_entropy(logits, batch.input_ids[rows], reduction="none") / p_mask[rows]
    return token_loss.sum() / (batch.response_length * batch.num_seqs)
