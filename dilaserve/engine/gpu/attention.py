"""Paged attention on the Triton kernel, as a drop-in for ``PagedAttention``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dilaserve.models.paged_attention import PagedAttention, PagedKVCache
from kernels.fused import rotary_store_kv
from kernels.paged_attention import paged_attention, write_kv_


@dataclass
class TritonPagedAttention:
    """Same constructor arguments and call as ``PagedAttention`` (see there).

    The padded query / key layouts are turned once per step into the kernel's compact form:
    query offsets (each request's queries are a contiguous run of the packed tokens, in
    request order, as the runner packs them), page tables (the slot of position ``j * page_size``
    names page ``j``) and context lengths. That takes a few small device ops and no host sync,
    so a step stays capturable in a CUDA graph.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor
    query_index: torch.Tensor
    query_valid: torch.Tensor
    key_slots: torch.Tensor
    key_valid: torch.Tensor
    query_positions: torch.Tensor | None = None  # block-causal models only (see PagedAttention)
    causal_block_size: int = 0
    query_start_loc: torch.Tensor = field(init=False)
    block_tables: torch.Tensor = field(init=False)
    context_lens: torch.Tensor = field(init=False)
    max_queries: int = field(init=False)
    query_pos_start: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        page_size = self.cache.page_size
        counts = self.query_valid.sum(1, dtype=torch.int32)
        self.query_start_loc = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
        self.block_tables = (self.key_slots[:, ::page_size] // page_size).to(torch.int32).contiguous()
        self.context_lens = self.key_valid.sum(1, dtype=torch.int32)
        self.max_queries = self.query_index.shape[1]
        # Each request's queries are consecutive positions: the first one places them all.
        self.query_pos_start = (self.query_positions[:, 0].to(torch.int32).contiguous()
                                if self.causal_block_size else None)

    @classmethod
    def from_backend(cls, backend: PagedAttention) -> "TritonPagedAttention":
        return cls(backend.cache, backend.slot_mapping, backend.query_index, backend.query_valid,
                   backend.key_slots, backend.key_valid, backend.query_positions, backend.causal_block_size)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        write_kv_(self.cache.k[layer_idx], self.cache.v[layer_idx], self.slot_mapping, k, v)
        return self.attend(layer_idx, q)

    def rotate_and_store(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotary embedding of q and k, with k and v stored in the cache, in one launch
        (``fused.rotary_store_kv``); returns the rotated q for ``attend``."""
        return rotary_store_kv(q, k, v, cos, sin, self.cache.k[layer_idx], self.cache.v[layer_idx],
                               self.slot_mapping)

    def attend(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the packed queries over the cache, the step's own k, v already in it."""
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        return paged_attention(
            q, k_pool, v_pool, self.query_start_loc, self.block_tables, self.context_lens,
            self.cache.page_size, max_queries=self.max_queries,
            causal_block_size=self.causal_block_size, query_pos_start=self.query_pos_start,
        )
