"""Paged KV cache storage and the attention backend that reads it (pure-torch path).

Keys and values live in a pool of token slots ``[num_slots, kv_heads, head_dim]`` per layer,
handed out in pages. For a packed step, each token's new k, v are written to its slot; then
each request's queries attend to all slots of its sequence (gathered through its page table).
The GPU kernel in ``kernels/`` computes the same function without the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        # What every layer of the step shares is worked out once: the key mask (dropped when it
        # hides nothing, so attention takes its unmasked path) and the packed <-> padded layout.
        num_requests, max_queries = self.query_index.shape
        self._flat_key_slots = self.key_slots.reshape(-1)
        mask = self.key_valid.unsqueeze(1)  # [R, 1, Lmax]
        if self.causal_block_size:
            k_pos = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)
            mask = mask & causal_block_mask(self.query_positions, k_pos, self.causal_block_size)
        self._mask = None if bool(mask.all()) else mask
        num_tokens = self.slot_mapping.shape[0]
        # Dense: every request computes the same number of tokens, so the packed tokens are the
        # padded layout already and need no gather or scatter.
        self._flat_query_index = self.query_index.reshape(-1)
        self._is_dense = (num_requests * max_queries == num_tokens and bool(self.query_valid.all())
                          and torch.equal(self._flat_query_index,
                                          torch.arange(num_tokens, device=self.query_index.device)))
        self._valid_rows = None if self._is_dense else self.query_valid.reshape(-1).nonzero().squeeze(1)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_pool.index_copy_(0, self.slot_mapping, k)
        v_pool.index_copy_(0, self.slot_mapping, v)
        num_requests, max_queries = self.query_index.shape
        padded_keys = (num_requests, self.key_slots.shape[1], *k.shape[1:])
        keys = k_pool.index_select(0, self._flat_key_slots).view(padded_keys)
        values = v_pool.index_select(0, self._flat_key_slots).view(padded_keys)
        if self._is_dense:
            queries = q.view(num_requests, max_queries, *q.shape[1:])
        else:
            queries = q.index_select(0, self._flat_query_index).view(num_requests, max_queries, *q.shape[1:])
        out = padded_attention(queries, keys, values, self._mask)
        out = out.reshape(num_requests * max_queries, *out.shape[2:])
        return out if self._valid_rows is None else out.index_select(0, self._valid_rows)
