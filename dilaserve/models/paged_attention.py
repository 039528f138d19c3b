"""Paged KV cache storage and the attention backend that reads it (pure-torch path).

Keys and values live in a pool of token slots ``[num_slots, kv_heads, head_dim]`` per layer,
handed out in pages. For a packed step, each token's new k, v are written to its slot; then
each request's queries attend to all slots of its sequence (gathered through its page table).
The GPU kernel in ``kernels/`` computes the same function without the gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dilaserve.models.attention import causal_block_mask, padded_attention


class PagedKVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_pages * page_size, num_kv_heads, head_dim)
        self.page_size = page_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PagedAttention:
    """Backend for one packed step over many requests.

    slot_mapping [N]: where each packed token's k, v go. query_index [R, Qmax] / query_valid:
    packed rows of each request's queries (padded). key_slots [R, Lmax] / key_valid: the slots of
    each request's sequence from position 0, in position order (padded), so key j is at
    position j. For block-causal models ``causal_block_size`` > 0 and ``query_positions``
    [R, Qmax] give each query's position: a query sees keys of its own and earlier blocks.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor
    query_index: torch.Tensor
    query_valid: torch.Tensor
    key_slots: torch.Tensor
    key_valid: torch.Tensor
    query_positions: torch.Tensor | None = None
    causal_block_size: int = 0
    # Phase-mixed steps attend per group of similar query counts (see _split_by_query_count);
    # off: one padded batch (kept for benchmarks that compare the two).
    group_by_query_count: ClassVar[bool] = True

    def __post_init__(self) -> None:
        # What every layer of the step shares is worked out once: the key mask (dropped when it
        # hides nothing, so attention takes its unmasked path) and the packed <-> padded layout.
        num_requests, max_queries = self.query_index.shape
        self._flat_key_slots = self.key_slots.reshape(-1)
        self._mask = self._key_mask(slice(None), self.key_slots.shape[1], max_queries)
        num_tokens = self.slot_mapping.shape[0]
        # Dense: every request computes the same number of tokens, so the packed tokens are the
        # padded layout already and need no gather or scatter.
        self._flat_query_index = self.query_index.reshape(-1)
        self._is_dense = (num_requests * max_queries == num_tokens and bool(self.query_valid.all())
                          and torch.equal(self._flat_query_index,
                                          torch.arange(num_tokens, device=self.query_index.device)))
        self._valid_rows = None if self._is_dense else self.query_valid.reshape(-1).nonzero().squeeze(1)
        self._groups = None if self._is_dense or not self.group_by_query_count else self._split_by_query_count()

    def _key_mask(self, rows, num_keys: int, num_queries: int) -> torch.Tensor | None:
        """The visibility mask of requests ``rows`` over their first ``num_keys`` keys and
        ``num_queries`` queries, or None when it hides nothing."""
        mask = self.key_valid[rows, :num_keys].unsqueeze(1)  # [R, 1, L]
        if self.causal_block_size:
            k_pos = torch.arange(num_keys, device=self.key_slots.device)
            mask = mask & causal_block_mask(self.query_positions[rows, :num_queries], k_pos, self.causal_block_size)
        return None if bool(mask.all()) else mask

    def _split_by_query_count(self) -> list[_Group] | None:
        """Groups of requests with similar query counts, each attended as its own padded batch,
        or None when one padded batch wastes little. A phase-mixed step pads every request to
        the longest one's queries: one refresh of 1024 tokens among reuse steps of 8 would make
        each of them compute 1024 query rows."""
        query_counts = self.query_valid.sum(1).tolist()
        key_counts = self.key_valid.sum(1).tolist()
        max_queries, max_keys = self.query_index.shape[1], self.key_slots.shape[1]
        needed = sum(q * k for q, k in zip(query_counts, key_counts))
        if len(query_counts) * max_queries * max_keys <= _PADDING_SLACK * needed + _GROUP_COST:
            return None
        runs = _partition(query_counts, key_counts)
        if len(runs) == 1:
            return None
        device = self.query_index.device
        groups = []
        for members in runs:
            num_queries = query_counts[members[0]]
            num_keys = max(key_counts[r] for r in members)
            rows = torch.tensor(members, device=device)
            valid = self.query_valid[rows, :num_queries].reshape(-1)
            query_index = self.query_index[rows, :num_queries].reshape(-1)
            valid_rows = valid.nonzero().squeeze(1)
            groups.append(_Group(
                len(members), num_queries, query_index, self.key_slots[rows, :num_keys].reshape(-1),
                self._key_mask(rows, num_keys, num_queries), valid_rows, query_index.index_select(0, valid_rows),
            ))
        return groups

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_pool.index_copy_(0, self.slot_mapping, k)
        v_pool.index_copy_(0, self.slot_mapping, v)
        if self._groups is not None:
            out = torch.empty_like(q)
            for g in self._groups:
                part = _attend(q, k_pool, v_pool, g.query_index, g.num_requests, g.num_queries, g.key_slots, g.mask)
                out.index_copy_(0, g.packed_rows, part.index_select(0, g.valid_rows))
            return out
        num_requests, max_queries = self.query_index.shape
        query_index = None if self._is_dense else self._flat_query_index
        out = _attend(q, k_pool, v_pool, query_index, num_requests, max_queries, self._flat_key_slots, self._mask)
        return out if self._valid_rows is None else out.index_select(0, self._valid_rows)


_PADDING_SLACK = 1.25  # padded score entries within this factor of the needed ones: one batch
_GROUP_COST = 4096  # score entries (query x key pairs) one more attention call is worth: its launch and gathers


@dataclass(frozen=True)
class _Group:
    """Requests attended as one padded batch: their queries' packed rows ``query_index``
    [R * Q] (padded), keys' slots ``key_slots`` [R * L], the mask, which padded rows are real
    (``valid_rows``) and where they go in the packed output (``packed_rows``)."""

    num_requests: int
    num_queries: int
    query_index: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor | None
    valid_rows: torch.Tensor
    packed_rows: torch.Tensor


def _attend(q, k_pool, v_pool, query_index, num_requests: int, num_queries: int, key_slots, mask) -> torch.Tensor:
    """Padded attention of ``num_requests`` requests: queries gathered by ``query_index`` (None:
    the packed rows are the padded layout), keys and values by ``key_slots``. [R * Q, H, D]."""
    padded_keys = (num_requests, key_slots.shape[0] // num_requests, *k_pool.shape[1:])
    keys = k_pool.index_select(0, key_slots).view(padded_keys)
    values = v_pool.index_select(0, key_slots).view(padded_keys)
    queries = q if query_index is None else q.index_select(0, query_index)
    out = padded_attention(queries.view(num_requests, num_queries, *q.shape[1:]), keys, values, mask)
    return out.reshape(num_requests * num_queries, *out.shape[2:])


def _partition(query_counts: list[int], key_counts: list[int]) -> list[list[int]]:
    """Splits the requests, sorted by query count (largest first), into runs that minimise the
    padded score entries (queries x keys per request, padded to each run's largest) plus
    ``_GROUP_COST`` a run; runs only break between different query counts. Returns each run's
    requests (indices), the run with the most queries per request first."""
    order = sorted(range(len(query_counts)), key=lambda r: -query_counts[r])
    qs = [query_counts[r] for r in order]
    ks = [key_counts[r] for r in order]
    cuts = [0] + [i for i in range(1, len(qs)) if qs[i] != qs[i - 1]] + [len(qs)]
    # best[j]: the least cost of the first cuts[j] requests; a run from cuts[i] to cuts[j] costs
    # its size x its largest query count x its largest key count.
    best = [0.0] + [float("inf")] * (len(cuts) - 1)
    prev = [0] * len(cuts)
    for j in range(1, len(cuts)):
        hi, run_keys = cuts[j], 0
        for i in range(j - 1, -1, -1):
            lo = cuts[i]
            run_keys = max(run_keys, max(ks[lo:cuts[i + 1]]))
            cost = best[i] + (hi - lo) * qs[lo] * run_keys + _GROUP_COST
            if cost < best[j]:
                best[j], prev[j] = cost, i
    runs, j = [], len(cuts) - 1
    while j > 0:
        runs.append(order[cuts[prev[j]]:cuts[j]])
        j = prev[j]
    return runs[::-1]
