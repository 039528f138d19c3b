"""Head-centric sparse KV (dLLM-Serve) for bidirectional models with the dual cache.

At a block-start refresh the whole sequence is computed as usual. Then, layer by layer, each KV
head scores the positions outside the current block by how much the block's queries attend to
them (softmax over the whole sequence, averaged over the block's queries and the head's query
group), averages each score with its neighbours' (``kv_smoothing`` positions), and keeps the
``sparse_keep`` highest. The kept keys and values are copied, densely, into the request's
*sparse region*: slot ``j`` of head ``h`` holds that head's ``j``-th kept position, so heads keep
different positions in the same slots (keys are stored after the rotary embedding and attention
is bidirectional, so a slot needs no position). Reuse steps then read the sparse region and the
block instead of the whole sequence.

``SparseSelectingAttention`` wraps the step's attention backend on a refresh that has such
requests: it runs the backend, then selects and copies for each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SelectionJob:
    """One request's selection in a refresh step (rows are packed-token rows)."""

    row_start: int  # the packed row of the request's position 0 (a refresh computes all of them)
    seq_len: int
    block_start: int
    block_end: int
    keep: int  # positions per KV head
    smoothing: int
    dst_slots: torch.Tensor  # [>= keep] KV slots of the request's sparse region


def kept_positions(q_block: torch.Tensor, k_seq: torch.Tensor, block_start: int, block_end: int, keep: int,
                   smoothing: int) -> torch.Tensor:
    """[KVH, keep] positions outside ``[block_start, block_end)`` each KV head keeps, ascending.

    q_block: [Bq, H, D] the block's queries; k_seq: [S, KVH, D] the sequence's keys."""
    seq_len, kv_heads, head_dim = k_seq.shape
    group = q_block.shape[1] // kv_heads
    q = q_block.float().view(q_block.shape[0], kv_heads, group, head_dim)
    logits = torch.einsum("bkgd,skd->kgbs", q, k_seq.float()) * head_dim ** -0.5
    attention = logits.softmax(dim=-1).mean(dim=(1, 2))  # [KVH, S]
    outside = torch.cat((torch.arange(0, block_start, device=k_seq.device),
                         torch.arange(block_end, seq_len, device=k_seq.device)))
    scores = attention[:, outside]
    if smoothing > 1:
        scores = F.avg_pool1d(scores.unsqueeze(1), smoothing, stride=1, padding=smoothing // 2,
                              count_include_pad=False).squeeze(1)
    chosen = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    return outside[chosen]


def copy_kept(cache, layer_idx: int, k_seq: torch.Tensor, v_seq: torch.Tensor, positions: torch.Tensor,
              dst_slots: torch.Tensor) -> None:
    """Writes head h's kept positions' keys and values into slots ``dst_slots[:keep]`` of head h."""
    kv_heads, keep = positions.shape
    heads = torch.arange(kv_heads, device=positions.device).unsqueeze(1)
    dst = dst_slots[:keep].unsqueeze(0)
    cache.k[layer_idx][dst, heads] = k_seq[positions, heads].to(cache.k[layer_idx].dtype)
    cache.v[layer_idx][dst, heads] = v_seq[positions, heads].to(cache.v[layer_idx].dtype)


class SparseSelectingAttention:
    """The step's attention backend, then each job's selection for the layer."""

    def __init__(self, inner, cache, jobs: list[SelectionJob]):
        self.inner, self.cache, self.jobs = inner, cache, jobs

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.inner(layer_idx, q, k, v)
        for job in self.jobs:
            if job.keep <= 0:
                continue
            rows = slice(job.row_start, job.row_start + job.seq_len)
            q_block = q[job.row_start + job.block_start: job.row_start + job.block_end]
            positions = kept_positions(q_block, k[rows], job.block_start, job.block_end, job.keep, job.smoothing)
            copy_kept(self.cache, layer_idx, k[rows], v[rows], positions, job.dst_slots)
        return out
