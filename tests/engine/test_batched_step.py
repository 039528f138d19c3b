"""The runner's batched pieces compute, row for row, what each request computes alone.

- ``select_chosen_batch``: one padded selection for many greedy requests commits exactly what
  each request's own ``select_chosen`` commits, ties included.
- ``PagedAttention``: requests of equal and of unequal lengths in one step (the packed layout
  used directly, or gathered into padding) give each request the rows it gets alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from dilaserve.generation.unmasking import FixedStepsUnmasker, ThresholdUnmasker, select_chosen_batch
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache


def _unmasker(rng: random.Random):
    if rng.random() < 0.5:
        return ThresholdUnmasker(rng.choice([0.3, 0.5, 0.9]))
    return FixedStepsUnmasker(rng.choice([1, 2, 3, 8]))


def test_batched_selection_equals_each_row_alone():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        num_rows = rng.randint(1, 6)
        sizes = [rng.randint(1, 12) for _ in range(num_rows)]
        width = max(sizes)
        # Few distinct values: many exact ties, where top-k's and argmax's choice must not move.
        confidence = torch.randint(0, 4, (num_rows, width), generator=gen).double() / 4
        for r, n in enumerate(sizes):
            confidence[r, n:] = -torch.inf
        unmaskers = [_unmasker(rng) for _ in sizes]
        steps = [rng.randint(0, 3) for _ in sizes]
        num_masked = [rng.randint(n, 16) for n in sizes]
        commit = select_chosen_batch(unmaskers, confidence, sizes, steps=steps, num_masked_in_block=num_masked)
        tokens = torch.arange(width)
        for r, n in enumerate(sizes):
            alone = unmaskers[r].select_chosen(
                tokens[:n], confidence[r, :n].clone(), step=steps[r], num_masked_in_block=num_masked[r])
            assert torch.equal(commit[r, :n], alone.commit), (unmaskers[r], confidence[r, :n], steps[r])
            assert not commit[r, n:].any()


def _step_inputs(lengths: list[tuple[int, int]], page_size: int, pages_per_request: int):
    """lengths: (computed tokens, sequence length) per request; computes each sequence's tail."""
    slots, query_index, query_valid, key_slots, key_valid = [], [], [], [], []
    q_max, l_max = max(q for q, _ in lengths), max(n for _, n in lengths)
    base = 0
    for r, (q, n) in enumerate(lengths):
        first_slot = r * pages_per_request * page_size
        all_slots = list(range(first_slot, first_slot + n))
        slots += all_slots[n - q:]
        query_index.append(list(range(base, base + q)) + [0] * (q_max - q))
        query_valid.append([True] * q + [False] * (q_max - q))
        key_slots.append(all_slots + [0] * (l_max - n))
        key_valid.append([True] * n + [False] * (l_max - n))
        base += q
    return (torch.tensor(slots), torch.tensor(query_index), torch.tensor(query_valid),
            torch.tensor(key_slots), torch.tensor(key_valid))


def _random_step(lengths, page_size: int, pages: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
    """A cache of random keys and values, and random q, k, v for the step's packed tokens."""
    cache = PagedKVCache(1, pages * len(lengths), page_size, kv_heads, head_dim, torch.float32, "cpu")
    cache.k[0].normal_()
    cache.v[0].normal_()
    num_tokens = sum(q for q, _ in lengths)
    return (cache, torch.randn(num_tokens, heads, head_dim), torch.randn(num_tokens, kv_heads, head_dim),
            torch.randn(num_tokens, kv_heads, head_dim))


def _assert_rows_equal_each_request_alone(batched, cache, pool, lengths, page_size, pages, q, k, v,
                                          causal_block_size=0):
    """Each request's rows of the batched output equal what it computes alone, on the cache as
    it was before the step (``pool``: its keys and values)."""
    slots, _, _, key_slots, key_valid = _step_inputs(lengths, page_size, pages)
    start = 0
    for r, (count, n) in enumerate(lengths):
        cache.k[0].copy_(pool[0])
        cache.v[0].copy_(pool[1])
        rows = slice(start, start + count)
        extra = dict(query_positions=torch.arange(n - count, n).unsqueeze(0),
                     causal_block_size=causal_block_size) if causal_block_size else {}
        alone = PagedAttention(cache, slots[rows], torch.arange(count).unsqueeze(0),
                               torch.ones(1, count, dtype=torch.bool), key_slots[r:r + 1, :n], key_valid[r:r + 1, :n],
                               **extra)
        torch.testing.assert_close(batched[rows], alone(0, q[rows], k[rows], v[rows]), rtol=1e-6, atol=1e-6)
        start += count


def test_paged_attention_batch_rows_equal_each_request_alone():
    torch.manual_seed(0)
    page_size, pages = 4, 8
    for lengths in ([(5, 12), (5, 12), (5, 12)], [(3, 12), (7, 9), (1, 20)], [(12, 12), (20, 20)]):
        cache, q, k, v = _random_step(lengths, page_size, pages)
        pool = cache.k[0].clone(), cache.v[0].clone()
        batched = PagedAttention(cache, *_step_inputs(lengths, page_size, pages))(0, q, k, v)
        _assert_rows_equal_each_request_alone(batched, cache, pool, lengths, page_size, pages, q, k, v)


def _tail_positions(lengths: list[tuple[int, int]]) -> torch.Tensor:
    q_max = max(q for q, _ in lengths)
    return torch.tensor([list(range(n - q, n)) + [n - 1] * (q_max - q) for q, n in lengths])


@pytest.mark.parametrize("causal_block_size", [0, 8])
def test_a_phase_mixed_step_attends_in_groups_and_matches_each_request_alone(causal_block_size):
    """Refreshes (every position queried) beside reuse steps of a few queries: attention runs
    per group of similar query counts instead of padding every request to the longest, and
    each request still gets the rows it gets alone."""
    torch.manual_seed(1)
    page_size, pages = 4, 16
    lengths = [(2, 30), (40, 40), (3, 41), (2, 25), (44, 44), (1, 50), (3, 33)]
    cache, q, k, v = _random_step(lengths, page_size, pages)
    pool = cache.k[0].clone(), cache.v[0].clone()
    extra = dict(query_positions=_tail_positions(lengths), causal_block_size=causal_block_size) \
        if causal_block_size else {}
    attn = PagedAttention(cache, *_step_inputs(lengths, page_size, pages), **extra)
    assert attn._groups is not None and len(attn._groups) >= 2
    assert sorted(torch.cat([g.packed_rows for g in attn._groups]).tolist()) == list(range(len(q)))
    batched = attn(0, q, k, v)
    _assert_rows_equal_each_request_alone(batched, cache, pool, lengths, page_size, pages, q, k, v,
                                          causal_block_size)


def test_steps_that_pad_little_stay_one_batch():
    lengths = [(5, 12), (4, 12), (5, 13)]
    cache = PagedKVCache(1, 8 * len(lengths), 4, 2, 8, torch.float32, "cpu")
    assert PagedAttention(cache, *_step_inputs(lengths, 4, 8))._groups is None
