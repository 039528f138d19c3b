"""Multi-step arithmetic word problems: a small, exactly checkable GSM8K.

A problem tells a short story about one person and one kind of item: a starting count,
then 2 to 4 changes applied in order, then a question about the final count::

    Mia has 23 marbles. She finds 14 more. She gives away 9. She ends up with 3 times
    as many. How many marbles does Mia have now?

Each change is one of four operations, each phrased several ways: add ``b`` (``b`` in
1..``max_operand``), subtract ``b`` (the count stays positive), multiply by ``k`` (``k`` in
2..4) or divide into ``k`` equal groups and keep one (``k`` in 2..5, only when it divides
evenly); no count ever exceeds ``max_value``. The registered task ``arith`` starts at 2..50,
adds or subtracts at most 50 and stays at or below 500. Every number in the story is
written in digits. The worked solution has one line per change,
``<before><op><operand>=<after>``, and ends with GSM8K's final-answer line::

    23+14=37
    37-9=28
    28*3=84
    #### 84

so the answer depends on several earlier tokens, and a model that commits digits of a
later line before the line it depends on is usually wrong: that is what makes confidence
thresholds trade quality for speed on this task.

Splits. A problem's identity is its arithmetic (start value and the sequence of operations
with their operands), not its wording. A hash of that identity puts 10% of identities in
``test``, 10% in ``validation`` and 80% in ``train``, so no test problem's arithmetic is
ever trained on, whatever names or phrasings it is told with. ``examples(split, num, seed)``
draws a deterministic list from one split.

Scoring is exact match of the integer after the last ``####`` in a completion (commas and
surrounding spaces ignored); a completion without one scores False.

``pad_prompt`` lengthens a problem to roughly a target number of tokens by putting worked
training examples (few-shot) before it, then neutral filler sentences; trace replay uses it
to give each request the prompt length its trace row names.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

_NAMES = {
    "Mia": "She", "Tom": "He", "Ana": "She", "Ben": "He", "Lily": "She", "Sam": "He",
    "Zoe": "She", "Max": "He", "Emma": "She", "Leo": "He", "Nora": "She", "Omar": "He",
    "Ivy": "She", "Raj": "He", "Eva": "She", "Kai": "He",
}
_ITEMS = (
    "apples", "marbles", "stickers", "coins", "books", "cards", "pencils", "shells",
    "stamps", "cookies", "balloons", "beads",
)
# {P}: pronoun, {N}: name, {x}: operand. Several phrasings per operation so the model must
# read the words, not the sentence position.
_PHRASES = {
    "+": ("{P} buys {x} more.", "{P} finds {x} more.", "{N} gets {x} more from a friend.",
          "Then {N} receives {x} more."),
    "-": ("{P} gives away {x}.", "{P} loses {x}.", "{N} sells {x} of them.", "Then {N} uses {x}."),
    "*": ("{P} ends up with {x} times as many.", "Then {N} has {x} times as many as before."),
    "/": ("{P} splits them into {x} equal groups and keeps one group.",
          "{N} shares them equally among {x} friends, keeping one share."),
}
FILLER_SENTENCES = (
    "Read the problem carefully.", "Work it out one step at a time.",
    "Write each step as an equation.", "Give the final answer after ####.",
)
_FINAL_RE = re.compile(r"####\s*(-?[\d,]+)")


@dataclass(frozen=True)
class Example:
    """One problem: the user's text, the worked solution, and the final answer."""

    prompt: str
    solution: str
    answer: str
    # The arithmetic identity the split is decided by: (start, (op, operand), ...).
    key: tuple = ()


@dataclass(frozen=True)
class ArithmeticTask:
    """Generator, splitter and scorer of one family of word problems."""

    name: str = "arith"
    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 50
    max_operand: int = 50
    max_value: int = 500

    # -- generation ------------------------------------------------------------------
    def make_example(self, rng: random.Random) -> Example:
        """One random problem, whichever split its identity belongs to."""
        name = rng.choice(sorted(_NAMES))
        pronoun, item = _NAMES[name], rng.choice(_ITEMS)
        start = value = rng.randint(2, self.max_start)
        sentences = [f"{name} has {value} {item}."]
        lines, ops = [], []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            op, operand = self._pick_operation(rng, value)
            new_value = _apply(op, value, operand)
            template = rng.choice(_PHRASES[op])
            sentences.append(template.format(P=pronoun, N=name, x=operand))
            lines.append(f"{value}{op}{operand}={new_value}")
            ops.append((op, operand))
            value = new_value
        sentences.append(f"How many {item} does {name} have now?")
        lines.append(f"#### {value}")
        key = (start,) + tuple(ops)
        return Example(prompt=" ".join(sentences), solution="\n".join(lines), answer=str(value), key=key)

    def _pick_operation(self, rng: random.Random, value: int) -> tuple[str, int]:
        while True:
            op = rng.choice("++--*/")
            if op == "+" and value + 1 <= self.max_value:
                return op, rng.randint(1, min(self.max_operand, self.max_value - value))
            if op == "-" and value >= 2:
                return op, rng.randint(1, min(self.max_operand, value - 1))
            if op == "*":
                factors = [k for k in (2, 3, 4) if value * k <= self.max_value]
                if factors:
                    return op, rng.choice(factors)
            if op == "/":
                divisors = [k for k in (2, 3, 4, 5) if value % k == 0]
                if divisors:
                    return op, rng.choice(divisors)

    # -- splits ----------------------------------------------------------------------
    def split_of(self, example: Example) -> Split:
        bucket = int.from_bytes(hashlib.sha256(repr(example.key).encode()).digest()[:8], "big") % 10
        return "test" if bucket == 0 else "validation" if bucket == 1 else "train"

    def iter_split(self, split: Split, seed: int) -> Iterator[Example]:
        """An endless deterministic stream of problems from one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        while True:
            example = self.make_example(rng)
            if self.split_of(example) == split:
                yield example

    def examples(self, split: Split, num: int, seed: int = 0) -> list[Example]:
        stream = self.iter_split(split, seed)
        return [next(stream) for _ in range(num)]

    # -- scoring ---------------------------------------------------------------------
    def score(self, completion: str, example: Example) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == example.answer

    # -- long prompts ----------------------------------------------------------------
    def pad_prompt(
        self, example: Example, target_tokens: int, count_tokens: Callable[[str], int], seed: int = 0,
    ) -> str:
        """The problem preceded by few-shot worked examples and filler, about ``target_tokens`` long.

        ``count_tokens(user_text)`` measures a candidate (callers decide whether the chat
        template counts). Few-shot examples come from the train split; the result never
        goes past the target by more than the problem itself does.
        """
        shots = self.iter_split("train", seed)
        rng = random.Random(f"{self.name}/pad/{seed}")
        preamble: list[str] = []
        while True:
            shot = next(shots)
            candidate = preamble + [format_shot(shot)]
            if count_tokens(join_prompt(candidate, example.prompt)) > target_tokens:
                break
            preamble = candidate
        while True:
            candidate = preamble + [rng.choice(FILLER_SENTENCES)]
            if count_tokens(join_prompt(candidate, example.prompt)) > target_tokens:
                break
            preamble = candidate
        return join_prompt(preamble, example.prompt)


def format_shot(example: Example) -> str:
    """A solved example as it appears in a few-shot preamble."""
    return f"{example.prompt}\n{example.solution}"


def join_prompt(preamble: list[str], question: str) -> str:
    return "\n\n".join(preamble + [question])


def extract_answer(completion: str) -> str | None:
    """The integer after the last ``####``, normalised (no commas, no leading zeros)."""
    matches = _FINAL_RE.findall(completion)
    if not matches:
        return None
    digits = matches[-1].replace(",", "")
    try:
        return str(int(digits))
    except ValueError:
        return None


def _apply(op: str, value: int, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    return value // operand
