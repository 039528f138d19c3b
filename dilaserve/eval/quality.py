"""Accuracy and decoding speed of one decoding setting on a checkable task.

Problems from the task's split are decoded by the engine (continuous batching, the same code
that serves requests) and scored by exact match on the final answer. Speed is measured as
tokens decided per step: committed positions over the steps each request took part in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from tqdm import tqdm

from dilaserve.engine.engine import Engine
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.tasks import get_task


@dataclass(frozen=True)
class QualityPoint:
    task: str
    split: str
    threshold: float | None
    steps: int | None
    chunk: int
    block_size: int
    cache: str
    num: int
    accuracy: float
    accuracy_ci: tuple[float, float]  # 95% Wilson interval
    tokens_per_step: float  # decided positions per step, over all requests
    mean_steps: float  # forwards per request
    kv_retention: float | None = None  # sparse KV's retention (None: dense)

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def encode_prompt(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(chat, add_special_tokens=False)


@dataclass(frozen=True)
class Tally:
    correct: int
    num: int
    tokens_decided: int
    steps: int


def decode_and_score(
    engine: Engine, prompts: Sequence[list[int]], examples: Sequence, decode: Callable[[list[int]], str],
    task: str, params: SamplingParams, *, progress: bool = False, label: str = "eval",
) -> Tally:
    """Decodes every prompt in one continuous batch and scores the completions."""
    for i, prompt in enumerate(prompts):
        engine.add(engine.make_request(f"eval-{i}", prompt, params))
    tokens: dict[str, list[int]] = {}
    counters = {}
    bar = tqdm(total=len(prompts), desc=label, disable=not progress, leave=False)
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                counters[out.request_id] = out.counters
                bar.update(1)
    bar.close()
    scorer = get_task(task)
    correct = sum(scorer.score(decode(tokens.get(f"eval-{i}", [])), ex) for i, ex in enumerate(examples))
    return Tally(correct, len(prompts), sum(c.num_tokens_decided for c in counters.values()),
                 sum(c.num_steps for c in counters.values()))


def evaluate(
    engine: Engine, tokenizer, *, task: str = "arith", split: str = "test", num: int = 200, seed: int = 0,
    max_tokens: int = 64, block_size: int = 32, threshold: float | None = 0.9, steps: int | None = None,
    chunk: int | None = None, cache: str = "dual", progress: bool = True, kv_retention: float | None = None,
) -> QualityPoint:
    """Decodes ``num`` problems of the split in one continuous batch and scores them."""
    problems = get_task(task).examples(split, num, seed)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    params = SamplingParams(max_tokens=max_tokens, block_size=block_size, threshold=threshold, steps=steps,
                            chunk_size=chunk, cache=cache, kv_retention=kv_retention,
                            stop_token_ids=(eot,) if isinstance(eot, int) and eot >= 0 else ())
    tally = decode_and_score(
        engine, [encode_prompt(tokenizer, p.prompt) for p in problems], problems,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True), task, params, progress=progress,
        label=f"eval {task} t={threshold} chunk={chunk or block_size}"
              + (f" kv_retention={kv_retention}" if kv_retention is not None else ""),
    )
    return QualityPoint(
        task=task, split=split, threshold=None if steps else threshold, steps=steps, chunk=chunk or block_size,
        block_size=block_size, cache=cache, num=num, accuracy=tally.correct / num if num else 0.0,
        accuracy_ci=wilson_interval(tally.correct, num),
        tokens_per_step=tally.tokens_decided / tally.steps if tally.steps else 0.0,
        mean_steps=tally.steps / num if num else 0.0, kv_retention=kv_retention,
    )
