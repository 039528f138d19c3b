"""Attention backends: how a layer's queries meet keys and values.

The model computes q, k, v for a packed set of tokens (shape ``[num_tokens, heads, head_dim]``)
and hands them to a backend, which knows how those tokens group into sequences and where
each sequence's other keys and values live. Every backend follows one rule:

    write the new k, v at their sequences' positions, then let each query attend to every
    stored position of its own sequence (bidirectional), or to the causal-block-visible ones.

A *refresh* step queries every position of a sequence; a *reuse* step queries only the
query set and reads the rest from the cache. With a refresh on every step this is exactly a
full forward, which is what makes the cached modes testable against the uncached one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, H, D], k/v: [N, KVH, D] for the packed tokens; returns [N, H, D]."""
        ...


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., KVH, L, D] -> [..., H, L, D] for grouped-query attention."""
    kv_heads = x.shape[-3]
    if kv_heads == num_heads:
        return x
    return x.repeat_interleave(num_heads // kv_heads, dim=-3)


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Batched bidirectional attention over padded sequences.

    q: [B, Q, H, D]; k, v: [B, L, KVH, D]; key_mask: [B, Q or 1, L] bool (True = visible), or
    None when every key is visible. Returns [B, Q, H, D]. Padded query rows must still see at
    least one key.
    """
    num_heads = q.shape[2]
    qh = q.transpose(1, 2)
    kh = _expand_kv(k.transpose(1, 2), num_heads)
    vh = _expand_kv(v.transpose(1, 2), num_heads)
    # An all-visible mask is dropped: SDPA then takes its fused path instead of the masked one.
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    mask = None if key_mask is None else key_mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2)


def causal_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Key visibility for block-causal models: a query sees keys of its own or earlier blocks."""
    return (k_pos.unsqueeze(-2) // block_size) <= (q_pos.unsqueeze(-1) // block_size)


@dataclass
class DenseAttention:
    """Packed full sequences, no cache: token i of sequence s sees every token of s.

    ``seq_lens`` gives the packed layout. If ``capture`` is set, each layer's k and v are kept
    (``captured[layer] = (k, v)`` with shape [N, KVH, D]) so a caller can fill a cache.
    """

    seq_lens: Sequence[int]
    positions: torch.Tensor | None = None
    causal_block_size: int = 0
    capture: bool = False

    def __post_init__(self) -> None:
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layout: tuple[torch.Tensor, torch.Tensor] | None = None

    def _pad_layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layout is None:
            lens = torch.tensor(list(self.seq_lens), device=device)
            max_len = int(lens.max())
            idx = torch.arange(max_len, device=device)
            valid = idx.unsqueeze(0) < lens.unsqueeze(1)  # [B, Lmax]
            starts = torch.cumsum(lens, 0) - lens
            gather = (starts.unsqueeze(1) + idx.unsqueeze(0)).clamp(max=int(lens.sum()) - 1)
            self._layout = (gather, valid)
        return self._layout

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.captured[layer_idx] = (k, v)
        gather, valid = self._pad_layout(q.device)
        mask = valid.unsqueeze(1)  # [B, 1, Lmax]
        if self.causal_block_size:
            pos = self.positions[gather]
            mask = mask & causal_block_mask(pos, pos, self.causal_block_size)
        out = padded_attention(q[gather], k[gather], v[gather], mask)
        return out[valid]


@dataclass
class ContiguousCacheAttention:
    """One batch of equal-length sequences with a contiguous per-layer cache (the reference).

    ``cache[layer]`` is a pair of tensors [B, L, KVH, D]. The queries are ``Q`` tokens per
    sequence at ``query_positions`` [B, Q]; their k, v are written into the cache at those
    positions and the queries attend to positions ``[0, visible_len)`` of the cache.
    """

    cache: list[tuple[torch.Tensor, torch.Tensor]]
    query_positions: torch.Tensor  # [B, Q]
    visible_len: int
    causal_block_size: int = 0

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, num_q = self.query_positions.shape
        k_cache, v_cache = self.cache[layer_idx]
        rows = torch.arange(batch, device=q.device).unsqueeze(1)
        k_cache[rows, self.query_positions] = k.view(batch, num_q, *k.shape[1:])
        v_cache[rows, self.query_positions] = v.view(batch, num_q, *v.shape[1:])
        keys = k_cache[:, : self.visible_len]
        values = v_cache[:, : self.visible_len]
        mask = torch.ones(batch, 1, self.visible_len, dtype=torch.bool, device=q.device)
        if self.causal_block_size:
            k_pos = torch.arange(self.visible_len, device=q.device).expand(batch, -1)
            mask = causal_block_mask(self.query_positions, k_pos, self.causal_block_size)
        out = padded_attention(q.view(batch, num_q, *q.shape[1:]), keys, values, mask)
        return out.reshape(batch * num_q, *q.shape[1:])


def new_contiguous_cache(
    num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (batch, length, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]
