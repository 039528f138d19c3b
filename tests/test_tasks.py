"""The task generator, its splits and scorer, and the task tokenizer."""

from __future__ import annotations

import random
import re

import pytest

from dilaserve.models.tokenizer import load_tokenizer, save_tokenizer
from dilaserve.tasks import TASKS, extract_answer, get_task
from dilaserve.tasks.arithmetic import Example
from dilaserve.tasks.tokens import ChatEncoder, build_task_tokenizer, learn_merges

TASK = get_task("arith")


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"{e.prompt}\n{e.solution}" for e in TASK.examples("train", 500, seed=0)]
    return build_task_tokenizer(corpus, num_merges=400)


def _check_solution(example: Example) -> None:
    lines = example.solution.split("\n")
    assert lines[-1] == f"#### {example.answer}"
    steps = lines[:-1]
    assert TASK.min_steps <= len(steps) <= TASK.max_steps
    value = example.key[0]
    for line, (op, operand) in zip(steps, example.key[1:]):
        lhs, rhs = line.split("=")
        assert lhs == f"{value}{op}{operand}"
        value = {"+": value + operand, "-": value - operand, "*": value * operand, "/": value // operand}[op]
        if op == "/":
            assert int(lhs.split("/")[0]) % operand == 0
        assert int(rhs) == value and 0 <= value <= TASK.max_value
    assert str(value) == example.answer


def test_examples_are_deterministic_per_seed():
    assert TASK.examples("test", 30, seed=3) == TASK.examples("test", 30, seed=3)
    assert TASK.examples("test", 30, seed=3) != TASK.examples("test", 30, seed=4)
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [TASK.make_example(rng_a) for _ in range(20)] == [TASK.make_example(rng_b) for _ in range(20)]


def test_solutions_are_correct_and_prompt_numbers_are_the_operands_in_order():
    rng = random.Random(0)
    for _ in range(500):
        example = TASK.make_example(rng)
        _check_solution(example)
        assert example.prompt.endswith("have now?")
        operands = [example.key[0]] + [operand for _, operand in example.key[1:]]
        assert [int(n) for n in re.findall(r"\d+", example.prompt)] == operands


def test_splits_are_disjoint_and_labelled():
    keys = {}
    for split in ("train", "validation", "test"):
        examples = TASK.examples(split, 400, seed=1)
        assert all(TASK.split_of(e) == split for e in examples)
        keys[split] = {e.key for e in examples}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_split_depends_on_arithmetic_not_wording():
    rng = random.Random(5)
    by_key: dict[tuple, set[str]] = {}
    for _ in range(20000):
        e = TASK.make_example(rng)
        by_key.setdefault(e.key, set()).add(TASK.split_of(e))
    assert all(len(splits) == 1 for splits in by_key.values())


def test_split_sizes_are_roughly_80_10_10():
    rng = random.Random(2)
    counts = {"train": 0, "validation": 0, "test": 0}
    for _ in range(5000):
        counts[TASK.split_of(TASK.make_example(rng))] += 1
    assert 0.07 < counts["test"] / 5000 < 0.13
    assert 0.07 < counts["validation"] / 5000 < 0.13


@pytest.mark.parametrize("completion, expected", [
    ("23+14=37\n37-9=28\n#### 28", True),
    ("#### 28", True),
    ("####28", True),
    ("#### 28.", True),
    ("#### 028", True),
    ("#### 29\n#### 28", True),  # the last final-answer line counts
    ("#### 28\n#### 29", False),
    ("37-9=28", False),  # no final-answer line
    ("", False),
    ("#### ", False),
    ("#### twenty-eight", False),
    ("#### -28", False),
    ("#### 2 8", False),
    ("### 28", False),
])
def test_score_exact_match(completion, expected):
    example = Example(prompt="", solution="", answer="28")
    assert TASK.score(completion, example) is expected


def test_score_ignores_thousands_separators():
    assert TASK.score("#### 1,084", Example("", "", "1084"))
    assert extract_answer("#### ,") is None


def test_registry():
    assert "arith" in TASKS
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_pad_prompt_reaches_the_target_and_ends_with_the_question():
    example = TASK.examples("test", 1)[0]
    count = lambda text: len(text.split())  # noqa: E731
    for target in (10, 100, 300, 1000):
        padded = TASK.pad_prompt(example, target, count, seed=0)
        assert padded.endswith(example.prompt)
        n = count(padded)
        assert n <= max(target, count(example.prompt))
        if target >= 100:
            assert n >= target - 12  # filler sentences close the gap to within one sentence
    assert TASK.pad_prompt(example, 300, count, seed=0) == TASK.pad_prompt(example, 300, count, seed=0)


def test_merges_never_touch_digits_or_cross_words():
    texts = ["Mia has 12 apples. She buys 30 more.", "Tom has 99 apples."] * 5
    merges = learn_merges(texts, 100)
    assert merges
    for a, b in merges:
        merged = a + b
        assert not any(ch.isdigit() for ch in merged)
        assert "Ġ" not in merged[1:]  # a space only ever starts a token


def test_chat_encoder_matches_the_chat_template(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    hf = load_tokenizer(tmp_path)
    encoder = ChatEncoder(tokenizer)
    examples = TASK.examples("test", 20)
    prompts = [e.prompt for e in examples] + [TASK.pad_prompt(examples[0], 200, lambda t: len(t.split()))]
    for text, ids in zip(prompts, encoder.prompt_ids(prompts)):
        chat = hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        assert ids == hf.encode(chat, add_special_tokens=False)
    for e in examples:
        solution_ids = encoder.text_ids([e.solution])[0]
        assert encoder.decode(solution_ids + [encoder.eos_id, encoder.mask_id]) == e.solution
        digits = sum(ch.isdigit() for ch in e.solution)
        assert sum(tokenizer.id_to_token(i).isdigit() for i in solution_ids) == digits  # one token per digit


def test_task_merges_shorten_prompts(tokenizer):
    example = TASK.examples("test", 1)[0]
    assert len(ChatEncoder(tokenizer).text_ids([example.prompt])[0]) < len(example.prompt.encode()) / 1.8
