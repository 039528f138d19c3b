"""Prompts of a trace's token counts, and how to check their answers.

A trace gives only lengths; a ``PromptBuilder`` turns a length into a prompt text and, when the
prompt is a task with a checkable answer, a scorer of the completion. ``TaskPromptBuilder``
poses the project's arithmetic word problems (``dilaserve.tasks``) padded with worked
examples to the length, so a replay measures accuracy as well as latency;
``FillerPromptBuilder`` writes plain filler for servers that cannot be scored.

Token counts are the client's estimate: with a ``tokenizer.json`` (``tokenizer_counter``) they
match the server's tokenizer up to the chat template; without one ``approx_token_count``
assumes four characters per token.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Callable, Protocol

Scorer = Callable[[str], bool]
TokenCounter = Callable[[str], int]


class PromptBuilder(Protocol):
    def build(self, prompt_tokens: int, rng: random.Random) -> tuple[str, Scorer | None]:
        """A prompt of about ``prompt_tokens`` tokens, and a scorer of its completion (or None)."""
        ...


def approx_token_count(text: str, chars_per_token: float = 4.0) -> int:
    """A tokenizer-free estimate: one token per ``chars_per_token`` characters, at least 1."""
    return max(1, round(len(text) / chars_per_token))


def tokenizer_counter(path: str | Path) -> TokenCounter:
    """Token counts from a Hugging Face ``tokenizer.json`` (a file or a model directory)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


_FILLER_WORDS = (
    "the", "system", "serves", "requests", "under", "latency", "targets", "while", "each", "replica",
    "decodes", "blocks", "of", "masked", "positions", "and", "streams", "committed", "tokens", "back",
)


class FillerPromptBuilder:
    """Random filler words to a token count; nothing to score."""

    def __init__(self, count_tokens: TokenCounter = approx_token_count):
        self.count_tokens = count_tokens

    def build(self, prompt_tokens: int, rng: random.Random) -> tuple[str, Scorer | None]:
        target = max(1, prompt_tokens)
        words = [rng.choice(_FILLER_WORDS) for _ in range(target + 1)]
        # The most words whose text stays within the target (a word is at least one token).
        low, high = 1, len(words)
        while low < high:
            mid = (low + high + 1) // 2
            if self.count_tokens(" ".join(words[:mid])) <= target:
                low = mid
            else:
                high = mid - 1
        return " ".join(words[:low]), None


class TaskPromptBuilder:
    """A checkable problem from ``dilaserve.tasks``, padded with worked examples to the length.

    Problems come from ``split`` (``test`` by default, never trained on) in a deterministic
    order fixed by ``seed``; the padding draws from the rng it is given.
    """

    def __init__(self, task: str = "arith", *, count_tokens: TokenCounter = approx_token_count,
                 split: str = "test", seed: int = 0):
        from dilaserve.tasks import get_task

        self.task = get_task(task)
        self.count_tokens = count_tokens
        self._problems = self.task.iter_split(split, seed)

    def build(self, prompt_tokens: int, rng: random.Random) -> tuple[str, Scorer | None]:
        example = next(self._problems)
        text = self.task.pad_prompt(example, prompt_tokens, self.count_tokens, seed=rng.randrange(2**31))
        return text, functools.partial(_score, self.task, example)


def _score(task, example, completion: str) -> bool:
    return bool(task.score(completion, example))


def make_prompt_builder(kind: str, *, count_tokens: TokenCounter = approx_token_count, seed: int = 0) -> PromptBuilder:
    """``filler``, or a task name (``arith``) whose answers are scored; ``ValueError`` if unknown."""
    if kind == "filler":
        return FillerPromptBuilder(count_tokens)
    return TaskPromptBuilder(kind, count_tokens=count_tokens, seed=seed)
