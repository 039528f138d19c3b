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


_SCORE_BYTES = 256 << 20  # float32 attention scores one batched selection may form at once


class BatchedSelection:
    """Every job's selection for one layer in a fixed number of tensor ops, whatever the number
    of jobs: the jobs' block queries, sequences and outside positions are padded into one batch
    (laid out once per step), scored, smoothed, ranked and copied together. It computes what
    ``kept_positions`` + ``copy_kept`` compute job by job (up to float rounding of the score
    sums), without a Python loop of ~20 small ops per job and layer, which on a GPU cost more
    host time than the arithmetic."""

    def __init__(self, jobs: list[SelectionJob], device: torch.device):
        self.jobs = jobs
        num_jobs = len(jobs)
        spans = [j.block_end - j.block_start for j in jobs]
        self.max_block, self.max_seq = max(spans), max(j.seq_len for j in jobs)
        self.max_outside = max(j.seq_len - n for j, n in zip(jobs, spans))
        self.max_keep = max(j.keep for j in jobs)
        row_start = torch.tensor([j.row_start for j in jobs])
        b = torch.arange(self.max_block)
        block_len = torch.tensor(spans)
        self.q_valid = b < block_len.unsqueeze(1)  # [J, B]
        q_rows = row_start.unsqueeze(1) + torch.tensor([j.block_start for j in jobs]).unsqueeze(1) + b
        self.q_rows = torch.where(self.q_valid, q_rows, row_start.unsqueeze(1))
        s = torch.arange(self.max_seq)
        seq_len = torch.tensor([j.seq_len for j in jobs])
        self.k_valid = s < seq_len.unsqueeze(1)  # [J, S]
        self.k_rows = torch.where(self.k_valid, row_start.unsqueeze(1) + s, row_start.unsqueeze(1))
        # Outside positions, compacted (the block removed), as kept_positions ranks them.
        outside = torch.zeros(num_jobs, self.max_outside, dtype=torch.long)
        for i, j in enumerate(jobs):
            pos = torch.cat((torch.arange(0, j.block_start), torch.arange(j.block_end, j.seq_len)))
            outside[i, :len(pos)] = pos
        self.outside = outside
        self.o_valid = torch.arange(self.max_outside) < (seq_len - block_len).unsqueeze(1)  # [J, O]
        self.query_count = block_len
        self.smoothing = sorted({j.smoothing for j in jobs})
        self.smooth_of = torch.tensor([j.smoothing for j in jobs])
        keep = torch.tensor([j.keep for j in jobs])
        t = torch.arange(self.max_keep)
        self.keep_valid = t < keep.unsqueeze(1)  # [J, K]
        self.row_start = row_start
        names = ("q_valid", "q_rows", "k_valid", "k_rows", "outside", "o_valid", "query_count", "smooth_of",
                 "keep_valid", "row_start")
        for name in names:
            setattr(self, name, getattr(self, name).to(device))
        # Slots of the sparse regions, padded (where they already are: on the device).
        self.dst = torch.nn.utils.rnn.pad_sequence([j.dst_slots[:j.keep].to(device) for j in jobs], batch_first=True)
        self._flat = None  # (valid (job, head, slot) entries, their slots, their heads), per KV head count

    def _flat_layout(self, kv_heads: int):
        if self._flat is None:
            valid = self.keep_valid.unsqueeze(1).expand(-1, kv_heads, -1).reshape(-1)
            index = valid.nonzero().squeeze(1)
            heads = torch.arange(kv_heads, device=index.device).view(1, -1, 1).expand(
                len(self.jobs), -1, self.max_keep).reshape(-1)
            slots = self.dst.unsqueeze(1).expand(-1, kv_heads, -1).reshape(-1)
            self._flat = (index, slots.index_select(0, index), heads.index_select(0, index))
        return self._flat

    def kept_positions(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[J, KVH, K] kept positions of each job and KV head, ascending in the first ``keep``
        slots (the rest: padding). q: [N, H, D], k: [N, KVH, D] the step's packed rows."""
        num_jobs = len(self.jobs)
        kv_heads, head_dim = k.shape[1], k.shape[2]
        group = q.shape[1] // kv_heads
        # Head-major gathers, so the score product batches over (head, job) without copies:
        # queries [KVH, J, G * B, D], keys [KVH, J, S, D].
        queries = q.view(q.shape[0], kv_heads, group, head_dim).index_select(0, self.q_rows.reshape(-1))
        queries = queries.view(num_jobs, self.max_block, kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
        queries = queries.reshape(kv_heads, num_jobs, group * self.max_block, head_dim).float()
        keys = k.transpose(0, 1).index_select(1, self.k_rows.reshape(-1)).float()
        keys = keys.view(kv_heads, num_jobs, self.max_seq, head_dim)
        logits = torch.matmul(queries, keys.transpose(-1, -2)).mul_(head_dim ** -0.5)  # [KVH, J, G*B, S]
        logits.masked_fill_(~self.k_valid.view(1, num_jobs, 1, -1), -torch.inf)
        attention = logits.softmax(dim=-1)
        # The mean over each job's real queries (padded query rows weigh nothing), as one product.
        weights = (self.q_valid / (self.query_count * group).unsqueeze(1)).repeat(1, group)  # [J, G*B]
        attention = torch.matmul(weights.view(1, num_jobs, 1, -1).to(attention.dtype), attention)
        attention = attention.view(kv_heads, num_jobs, self.max_seq).transpose(0, 1)  # [J, KVH, S]
        scores = attention.gather(2, self.outside.unsqueeze(1).expand(-1, kv_heads, -1))  # [J, KVH, O]
        valid = self.o_valid.unsqueeze(1).expand(-1, kv_heads, -1)
        scores = scores.masked_fill(~valid, 0.0)
        smoothed = scores
        for width in self.smoothing:
            if width <= 1:
                continue
            ones = torch.ones(1, 1, width, device=scores.device)
            total = F.conv1d(scores.reshape(-1, 1, self.max_outside), ones, padding=width // 2)
            count = F.conv1d(valid.float().reshape(-1, 1, self.max_outside), ones, padding=width // 2)
            mean = (total / count.clamp_(min=1)).view_as(scores)
            smoothed = torch.where((self.smooth_of == width).view(-1, 1, 1), mean, smoothed)
        smoothed = smoothed.masked_fill(~valid, -torch.inf)
        chosen = smoothed.topk(self.max_keep, dim=-1).indices  # best first
        positions = self.outside.unsqueeze(1).expand(-1, kv_heads, -1).gather(2, chosen)
        positions = positions.masked_fill(~self.keep_valid.unsqueeze(1), self.max_seq)  # padding sorts last
        return positions.sort(dim=-1).values

    def select_and_copy(self, cache, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv_heads = k.shape[1]
        positions = self.kept_positions(q, k)
        index, slots, heads = self._flat_layout(kv_heads)
        rows = (positions + self.row_start.view(-1, 1, 1)).reshape(-1).index_select(0, index)
        cache.k[layer_idx][slots, heads] = k[rows, heads].to(cache.k[layer_idx].dtype)
        cache.v[layer_idx][slots, heads] = v[rows, heads].to(cache.v[layer_idx].dtype)


def batch_jobs(jobs: list[SelectionJob], num_heads: int, device: torch.device) -> list[BatchedSelection]:
    """The step's jobs with something to keep, in batches whose scores fit ``_SCORE_BYTES``."""
    jobs = [j for j in jobs if j.keep > 0]
    batches, current = [], []
    for job in sorted(jobs, key=lambda j: j.seq_len):
        trial = current + [job]
        size = (len(trial) * num_heads * max(j.block_end - j.block_start for j in trial)
                * max(j.seq_len for j in trial) * 4)
        if current and size > _SCORE_BYTES:
            batches.append(BatchedSelection(current, device))
            trial = [job]
        current = trial
    if current:
        batches.append(BatchedSelection(current, device))
    return batches


class SparseSelectingAttention:
    """The step's attention backend, then every job's selection for the layer: on a GPU batched
    (``BatchedSelection``: a fixed number of launches a layer), elsewhere job by job (on a CPU
    the batch's padding and gathers cost more than the loop)."""

    def __init__(self, inner, cache, jobs: list[SelectionJob]):
        self.inner, self.cache, self.jobs = inner, cache, jobs
        self._batches: list[BatchedSelection] | None = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.inner(layer_idx, q, k, v)
        if q.device.type == "cuda":
            if self._batches is None:
                self._batches = batch_jobs(self.jobs, q.shape[1], q.device)
            for batch in self._batches:
                batch.select_and_copy(self.cache, layer_idx, q, k, v)
            return out
        for job in self.jobs:
            if job.keep <= 0:
                continue
            rows = slice(job.row_start, job.row_start + job.seq_len)
            q_block = q[job.row_start + job.block_start: job.row_start + job.block_end]
            positions = kept_positions(q_block, k[rows], job.block_start, job.block_end, job.keep, job.smoothing)
            copy_kept(self.cache, layer_idx, k[rows], v[rows], positions, job.dst_slots)
        return out
