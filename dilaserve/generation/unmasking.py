"""Unmasking strategies: given logits for a request's queried, still-masked positions,
choose which positions to commit this step and with which tokens.

Each strategy is one small class behind ``Unmasker.select``; the reference generator and
the engine both call it, so a request decodes by the same rule alone or in a batch.

Semantics follow the published code:
- ``ThresholdUnmasker``: Fast-dLLM's parallel decoding: commit every queried position whose
  confidence (softmax probability of its chosen token, float64) reaches the threshold, and
  always the most confident one.
- ``FixedStepsUnmasker``: LLaDA's schedule: a block's masked positions are split evenly over
  its steps (earlier steps take the remainder); each step commits that many, most confident
  first (``low_confidence``) or at random (``random``).
- ``DreamUnmasker``: Dream's ``diffusion_generate`` algorithms ``origin``, ``maskgit_plus``,
  ``topk_margin``, ``entropy`` on a timestep schedule ``linspace(1, eps, steps + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dilaserve.errors import InvalidRequestError

from dilaserve.generation.names import DREAM_ALGORITHMS, REMASKING, scheduled_count


@dataclass(frozen=True)
class Selection:
    commit: torch.Tensor  # [Q] bool: which queried positions commit this step
    tokens: torch.Tensor  # [Q] long: the token each queried position would take


class Unmasker(Protocol):
    def select(
        self, logits: torch.Tensor, *, step: int, num_masked_in_block: int, generator: torch.Generator | None
    ) -> Selection:
        """logits: [Q, V] for the queried masked positions in position order; ``step`` counts
        this block's steps from 0; ``num_masked_in_block`` is the block's mask count at the
        block's first step (what LLaDA's schedule divides)."""
        ...

    def steps_for_block(self, block_len: int) -> int | None:
        """Forwards a block takes, when the strategy fixes it (None: until decided)."""
        ...


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's sampling by Gumbel-max in float64: exp(logits) / (-log u) ** temperature."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(u)) ** temperature


def choose_tokens(
    logits: torch.Tensor, temperature: float, remasking: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA / Fast-dLLM: token = argmax of noised logits; confidence = its float64 softmax
    probability under the un-noised logits (or uniform noise for ``random`` remasking)."""
    tokens = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)
    if remasking == "low_confidence":
        probs = F.softmax(logits.to(torch.float64), dim=-1)
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = torch.rand(tokens.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return tokens, confidence


def is_greedy_llada(unmasker: Unmasker) -> bool:
    """Strategies whose token choice is a plain row-wise argmax + softmax confidence, so a
    batch of requests can share one pass (``choose_tokens`` on all their rows at once)."""
    return (isinstance(unmasker, (ThresholdUnmasker, FixedStepsUnmasker)) and unmasker.temperature == 0
            and unmasker.remasking == "low_confidence")


def select_chosen_batch(
    unmaskers: list["ThresholdUnmasker | FixedStepsUnmasker"], confidence: torch.Tensor, num_queries: list[int],
    *, steps: list[int], num_masked_in_block: list[int],
) -> torch.Tensor:
    """``select_chosen`` for many greedy requests at once (``is_greedy_llada``).

    confidence: [R, Q], row r holding request r's ``num_queries[r]`` confidences, then padding
    (-inf). Returns commit [R, Q] bool, row r equal
    to what ``unmaskers[r].select_chosen`` returns for its own row, ties included: the argmax
    takes the first maximum, as on one row, and top-k runs on rows grouped by (length, k), so
    it sees exactly the row it would see alone.
    """
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    threshold_rows, top_groups = [], {}
    for r, (unmasker, n) in enumerate(zip(unmaskers, num_queries)):
        if isinstance(unmasker, ThresholdUnmasker):
            threshold_rows.append(r)
        else:
            k = unmasker.commit_count(steps[r], num_masked_in_block[r], n)
            if k > 0:
                top_groups.setdefault((n, k), []).append(r)
    if threshold_rows:
        thresholds = {unmaskers[r].threshold for r in threshold_rows}
        threshold = thresholds.pop() if len(thresholds) == 1 else torch.tensor(
            [unmaskers[r].threshold for r in threshold_rows], dtype=confidence.dtype, device=confidence.device
        ).unsqueeze(1)
        rows, conf = _rows(confidence, threshold_rows)
        chosen = conf >= threshold
        chosen.scatter_(1, conf.argmax(dim=1, keepdim=True), True)
        _set_rows(commit, rows, chosen)
    for (n, k), group in top_groups.items():
        rows, conf = _rows(confidence, group)
        chosen = torch.zeros_like(conf, dtype=torch.bool)
        chosen.scatter_(1, torch.topk(conf[:, :n], k=k, dim=1).indices, True)
        _set_rows(commit, rows, chosen)
    return commit


def _rows(x: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(index, x[rows]); index None when ``rows`` is every row, in order."""
    if len(rows) == x.shape[0]:
        return None, x
    index = torch.tensor(rows, device=x.device)
    return index, x.index_select(0, index)


def _set_rows(x: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
    if index is None:
        x.copy_(values)
    else:
        x.index_copy_(0, index, values)


def _top(confidence: torch.Tensor, k: int) -> torch.Tensor:
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    if k > 0:
        commit[torch.topk(confidence, k=min(k, confidence.numel())).indices] = True
    return commit


class _ChoosesLikeLLaDA:
    """LLaDA / Fast-dLLM strategies: tokens and confidences from ``choose_tokens``, then a rule
    over confidences (``select_chosen``), which a batch of greedy requests can call directly."""

    def select(self, logits, *, step, num_masked_in_block, generator):
        tokens, confidence = choose_tokens(logits, self.temperature, self.remasking, generator)
        return self.select_chosen(tokens, confidence, step=step, num_masked_in_block=num_masked_in_block)


@dataclass(frozen=True)
class ThresholdUnmasker(_ChoosesLikeLLaDA):
    threshold: float
    temperature: float = 0.0
    remasking: str = "low_confidence"

    def select_chosen(self, tokens, confidence, *, step, num_masked_in_block):
        commit = confidence >= self.threshold
        commit[confidence.argmax()] = True
        return Selection(commit, tokens)

    def steps_for_block(self, block_len):
        return None


@dataclass(frozen=True)
class FixedStepsUnmasker(_ChoosesLikeLLaDA):
    steps_per_block: int
    temperature: float = 0.0
    remasking: str = "low_confidence"

    def select_chosen(self, tokens, confidence, *, step, num_masked_in_block):
        k = self.commit_count(step, num_masked_in_block, confidence.numel())
        return Selection(_top(confidence, k), tokens)

    def commit_count(self, step: int, num_masked_in_block: int, num_queries: int) -> int:
        """How many of ``num_queries`` queried positions this step commits."""
        return scheduled_count(num_masked_in_block, self.steps_per_block, step, num_queries)

    def steps_for_block(self, block_len):
        return self.steps_per_block


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_sample(
    logits: torch.Tensor, algorithm: str, temperature: float, top_p: float | None, top_k: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's sample_tokens: (confidence, token) per row, confidence by the algorithm."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_filter(logits, top_p)
    if top_k is not None:
        logits = _top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if algorithm == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif algorithm == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, tokens


@dataclass(frozen=True)
class DreamUnmasker:
    algorithm: str
    steps_per_block: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    eps: float = 1e-3

    def _fraction(self, step: int) -> float:
        """Share of the remaining masks to commit at ``step``: 1 - s/t on the timestep grid."""
        if step >= self.steps_per_block - 1:
            return 1.0
        # The same float32 grid as Dream's torch.linspace.
        grid = torch.linspace(1, self.eps, self.steps_per_block + 1)
        t, s = float(grid[step]), float(grid[step + 1])
        return 1 - s / t

    def select(self, logits, *, step, num_masked_in_block, generator):
        num_masked = logits.shape[0]
        fraction = self._fraction(step)
        if self.algorithm == "origin":
            draw = torch.rand(num_masked, device=logits.device, generator=generator)
            commit = draw < fraction
            tokens = torch.zeros(num_masked, dtype=torch.long, device=logits.device)
            if commit.any():
                _, tokens[commit] = dream_sample(logits[commit], "maskgit_plus", self.temperature, self.top_p, self.top_k, generator)
            return Selection(commit, tokens)
        confidence, tokens = dream_sample(logits, self.algorithm, self.temperature, self.top_p, self.top_k, generator)
        k = num_masked if fraction >= 1.0 else int(num_masked * fraction)
        if k <= 0:
            return Selection(torch.zeros(num_masked, dtype=torch.bool, device=logits.device), tokens)
        if not self.alg_temp:
            return Selection(_top(confidence, k), tokens)
        weights = F.softmax(confidence / self.alg_temp, dim=-1)
        chosen = torch.multinomial(weights, num_samples=k, generator=generator)
        commit = torch.zeros(num_masked, dtype=torch.bool, device=logits.device)
        commit[chosen] = True
        return Selection(commit, tokens)

    def steps_for_block(self, block_len):
        return self.steps_per_block


def make_unmasker(
    *, algorithm: str = "llada", threshold: float | None = None, steps_per_block: int | None = None,
    temperature: float = 0.0, remasking: str = "low_confidence", top_p: float | None = None,
    top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
) -> Unmasker:
    """Validates the settings and returns the strategy they name."""
    if temperature < 0 or not math.isfinite(temperature):
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {temperature}")
    if threshold is not None and not (0.0 < threshold <= 1.0):
        raise InvalidRequestError(f"threshold must be in (0, 1], got {threshold}")
    if algorithm in DREAM_ALGORITHMS:
        if steps_per_block is None or steps_per_block < 1:
            raise InvalidRequestError(f"Dream algorithm {algorithm!r} needs steps >= 1 per block")
        return DreamUnmasker(algorithm, steps_per_block, temperature, top_p, top_k, alg_temp, eps)
    if algorithm != "llada":
        raise InvalidRequestError(
            f"unknown unmasking algorithm {algorithm!r}; known: llada, {', '.join(DREAM_ALGORITHMS)}"
        )
    if remasking not in REMASKING:
        raise InvalidRequestError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if threshold is not None:
        return ThresholdUnmasker(threshold, temperature, remasking)
    if steps_per_block is None or steps_per_block < 1:
        raise InvalidRequestError("give either a threshold or a number of steps >= 1 per block")
    return FixedStepsUnmasker(steps_per_block, temperature, remasking)
