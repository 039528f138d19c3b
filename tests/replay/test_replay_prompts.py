"""Prompt builders: task prompts of a target length whose answers are scored."""

from __future__ import annotations

import random

import pytest

from dilaserve.replay.prompts import TaskPromptBuilder, approx_token_count, make_prompt_builder

tasks = pytest.importorskip("dilaserve.tasks", reason="the checkable-task generator is not in this checkout")


def test_task_prompts_reach_the_length_and_score_answers():
    builder = TaskPromptBuilder("arith", seed=0)
    expected = tasks.get_task("arith").iter_split("test", 0)
    rng = random.Random(0)
    for target in (20, 300, 1200):
        example = next(expected)
        text, scorer = builder.build(target, rng)
        assert text.endswith(example.prompt)  # the question comes last, after worked examples
        assert approx_token_count(text) <= max(target, approx_token_count(example.prompt))
        if target >= 300:
            assert approx_token_count(text) >= 0.8 * target
        assert scorer(example.solution) is True
        assert scorer(f"#### {int(example.answer) + 1}") is False
        assert scorer("no answer") is False


def test_make_prompt_builder_kinds():
    assert make_prompt_builder("filler").build(10, random.Random(0))[1] is None
    with pytest.raises(ValueError, match="unknown task"):
        make_prompt_builder("no-such-task")


def test_tokenizer_counter_reads_a_model_directory(tmp_path):
    from dilaserve.models.tokenizer import build_byte_tokenizer, save_tokenizer
    from dilaserve.replay.prompts import FillerPromptBuilder, tokenizer_counter

    save_tokenizer(build_byte_tokenizer(), tmp_path)
    count = tokenizer_counter(tmp_path)
    assert count("abc") == 3  # bytes, no merges
    text, _ = FillerPromptBuilder(count).build(50, random.Random(1))
    assert 45 <= count(text) <= 50
