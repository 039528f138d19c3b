"""Task accuracy of a model during training, decoded by the serving engine.

Threshold decoding without a cache (every step a full forward), semi-autoregressive blocks,
through ``dilaserve.engine`` so training-time numbers come from the same decoder that serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.eval.quality import decode_and_score
from dilaserve.models.base import DiffusionLM
from dilaserve.tasks.arithmetic import ArithmeticTask, Example
from dilaserve.tasks.tokens import ChatEncoder


@dataclass(frozen=True)
class EvalResult:
    threshold: float
    num_examples: int
    accuracy: float
    tokens_per_step: float  # committed positions / forward passes, over all examples
    mean_steps: float


def evaluate(
    model: DiffusionLM, encoder: ChatEncoder, task: ArithmeticTask, examples: Sequence[Example], *,
    threshold: float, gen_length: int = 64, block_size: int = 32, batch_size: int = 256, cache: str = "none",
) -> EvalResult:
    """Exact-match accuracy and tokens decided per step of threshold decoding."""
    engine = Engine(model, EngineConfig(max_running=batch_size, max_batch_tokens=1 << 20,
                                        max_refresh_tokens=1 << 20, kv_memory_gib=1.0))
    params = SamplingParams(max_tokens=gen_length, block_size=block_size, threshold=max(threshold, 1e-6), cache=cache)
    tally = decode_and_score(engine, encoder.prompt_ids([e.prompt for e in examples]), examples, encoder.decode,
                             task.name, params)
    return EvalResult(threshold, len(examples), tally.correct / len(examples),
                      tally.tokens_decided / max(tally.steps, 1), tally.steps / len(examples))
