"""CUDA graphs for the model forward of reuse steps, one graph per padded step shape.

A reuse step is small (each request computes its block window, ~32 tokens) and, at batch 1,
launch-bound: hundreds of kernel launches for a few milliseconds of weight reads. Replaying a
captured graph removes the launches. A graph is fixed to its tensor shapes, so a step's inputs
are padded up to a bucket (``StepShape``) before replay:

- requests: real requests keep their packed layout; padding tokens are appended and owned by
  extra *dummy* requests, whose queries are those tokens and whose only key is the scratch
  slot, a KV slot no real request uses. Padding therefore writes only the scratch slot, reads
  only it, and its rows are dropped: real rows compute exactly what they compute unpadded.
- keys: each request's key slots are padded with invalid entries up to the bucket's length.

Only the forward through the transformer is graphed; the logit budget runs after it, on the
real rows. Refresh steps run eagerly (they are large, so launches do not matter).

Block-causal models (SDAR) have no refresh: every step may replay, and the attention also reads
each request's first query position, gathered inside the graph from the padded inputs
(``causal_attention_args``); a dummy request's queries sit at position 0, so its only key (the
scratch slot, position 0) stays visible under the block-causal mask.
``pad_step_inputs`` is pure and tested on CPU; ``ReuseGraphs`` needs CUDA.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInputs:
    """A packed step's model inputs (CPU or device tensors), in the layout ``PagedAttention`` reads."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    query_index: torch.Tensor  # [R, Q]
    query_valid: torch.Tensor  # [R, Q]
    key_slots: torch.Tensor  # [R, L]
    key_valid: torch.Tensor  # [R, L]

    @property
    def shape(self) -> "StepShape":
        return StepShape(self.query_index.shape[0], self.input_ids.shape[0], self.query_index.shape[1],
                         self.key_slots.shape[1])

    def to(self, device) -> "StepInputs":
        return StepInputs(*(t.to(device, non_blocking=True) for t in (
            self.input_ids, self.positions, self.slot_mapping, self.query_index, self.query_valid,
            self.key_slots, self.key_valid)))


@dataclass(frozen=True, order=True)
class StepShape:
    requests: int
    tokens: int
    queries: int  # per request
    keys: int  # per request


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _pow2(x: int, least: int = 1) -> int:
    return max(least, 1 << max(0, (x - 1).bit_length()))


def bucket_for(shape: StepShape, page_size: int) -> StepShape:
    """The padded shape a step of ``shape`` replays in: queries per request to a power of two
    (at least 8), tokens to a multiple of 32 (then of 128 past 512), keys to a power of two of
    pages (at least 256 tokens), and requests to a power of two with room for the dummy
    requests that own the padding tokens."""
    queries = _pow2(shape.queries, 8)
    tokens = _round_up(shape.tokens, 32 if shape.tokens <= 512 else 128)
    keys = _round_up(_pow2(shape.keys, 256), page_size)
    dummies = -(-(tokens - shape.tokens) // queries)
    return StepShape(_pow2(shape.requests + dummies), tokens, queries, keys)


def pad_step_inputs(inputs: StepInputs, target: StepShape, scratch_slot: int, pad_token_id: int) -> StepInputs:
    """``inputs`` padded to ``target`` (see the module docstring); the real requests' rows come
    first and unchanged."""
    real = inputs.shape
    if not (real.tokens <= target.tokens and real.queries <= target.queries and real.keys <= target.keys):
        raise ValueError(f"step {real} does not fit {target}")
    extra = target.tokens - real.tokens
    dummies = -(-extra // target.queries)
    if real.requests + dummies > target.requests:
        raise ValueError(f"step {real} needs {dummies} dummy requests; {target} has no room")
    R, T, Q, L = target.requests, target.tokens, target.queries, target.keys

    def grow(t: torch.Tensor, size: int, fill) -> torch.Tensor:
        return torch.cat([t, torch.full((size - t.shape[0],), fill, dtype=t.dtype)])

    input_ids = grow(inputs.input_ids, T, pad_token_id)
    positions = grow(inputs.positions, T, 0)
    slot_mapping = grow(inputs.slot_mapping, T, scratch_slot)
    query_index = torch.zeros(R, Q, dtype=inputs.query_index.dtype)
    query_valid = torch.zeros(R, Q, dtype=torch.bool)
    key_slots = torch.zeros(R, L, dtype=inputs.key_slots.dtype)
    key_valid = torch.zeros(R, L, dtype=torch.bool)
    query_index[:real.requests, :real.queries] = inputs.query_index
    query_valid[:real.requests, :real.queries] = inputs.query_valid
    key_slots[:real.requests, :real.keys] = inputs.key_slots
    key_valid[:real.requests, :real.keys] = inputs.key_valid
    # Dummy requests: the padding tokens in runs of at most Q; every dummy (and every unused
    # request row) sees the scratch slot only, so no row attends to nothing.
    for i in range(real.requests, R):
        first = real.tokens + (i - real.requests) * Q
        count = max(0, min(Q, T - first))
        query_index[i, :count] = torch.arange(first, first + count)
        query_valid[i, :count] = True
        key_slots[i, 0] = scratch_slot
        key_valid[i, 0] = True
    return StepInputs(input_ids, positions, slot_mapping, query_index, query_valid, key_slots, key_valid)


def causal_attention_args(inputs: StepInputs, causal_block_size: int) -> dict:
    """The block-causal attention's extra arguments, from the step's own tensors (device ops
    only, so a graph captures them): each query's position, and the block size."""
    if not causal_block_size:
        return {}
    return {"query_positions": inputs.positions[inputs.query_index], "causal_block_size": causal_block_size}


class ReuseGraphs:
    """Captures and replays the model forward per padded step shape (CUDA only).

    ``run(inputs)`` returns the hidden states of the real tokens, or None when the step does
    not fit (too many tokens or requests): the caller then runs it eagerly. Graphs share one
    memory pool; at most ``max_graphs`` are kept (least recently used dropped).
    """

    def __init__(self, model, cache, attention_cls, scratch_slot: int, pad_token_id: int, *,
                 ops=None, max_tokens: int = 2048, max_requests: int = 256, max_graphs: int = 48,
                 causal_block_size: int = 0):
        self.model, self.cache, self.attention_cls, self.ops = model, cache, attention_cls, ops
        self.causal_block_size = causal_block_size
        self.scratch_slot, self.pad_token_id = scratch_slot, pad_token_id
        self.max_tokens, self.max_requests, self.max_graphs = max_tokens, max_requests, max_graphs
        self.device = next(model.parameters()).device
        self._graphs: OrderedDict[StepShape, tuple[torch.cuda.CUDAGraph, StepInputs, torch.Tensor]] = OrderedDict()
        self._pool = None
        self._max_position = 0  # graphs read the rotary table as it was when they were captured
        self.num_captures = 0
        self.num_replays = 0

    def fits(self, shape: StepShape, max_position: int) -> bool:
        target = bucket_for(shape, self.cache.page_size)
        return (target.tokens <= self.max_tokens and target.requests <= self.max_requests
                and max_position < self._rotary_len())

    def _rotary_len(self) -> int:
        from dilaserve.models.layers import _ROTARY_TABLES

        lengths = [t[0].shape[0] for key, t in _ROTARY_TABLES.items() if key[0] == self.device]
        return min(lengths) if lengths else 0

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        attn = self.attention_cls(self.cache, inputs.slot_mapping, inputs.query_index, inputs.query_valid,
                                  inputs.key_slots, inputs.key_valid,
                                  **causal_attention_args(inputs, self.causal_block_size))
        return self.model(inputs.input_ids, inputs.positions, attn, self.ops)

    def _capture(self, target: StepShape):
        R, T, Q, L = target.requests, target.tokens, target.queries, target.keys
        dev = self.device
        static = StepInputs(
            torch.full((T,), self.pad_token_id, dtype=torch.long, device=dev),
            torch.zeros(T, dtype=torch.long, device=dev),
            torch.full((T,), self.scratch_slot, dtype=torch.long, device=dev),
            torch.zeros(R, Q, dtype=torch.long, device=dev), torch.zeros(R, Q, dtype=torch.bool, device=dev),
            torch.full((R, L), self.scratch_slot, dtype=torch.long, device=dev),
            torch.zeros(R, L, dtype=torch.bool, device=dev),
        )
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self._forward(static)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(static)
        self.num_captures += 1
        return graph, static, out

    @torch.no_grad()
    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """``inputs`` on the CPU; the hidden states [real tokens, d] on the device, or None."""
        shape = inputs.shape
        max_position = int(inputs.positions.max()) if inputs.positions.numel() else 0
        if not self.fits(shape, max_position):
            return None
        target = bucket_for(shape, self.cache.page_size)
        entry = self._graphs.get(target)
        if entry is None:
            entry = self._capture(target)
            self._graphs[target] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(target)
        graph, static, out = entry
        padded = pad_step_inputs(inputs, target, self.scratch_slot, self.pad_token_id)
        for dst, src in zip(
            (static.input_ids, static.positions, static.slot_mapping, static.query_index, static.query_valid,
             static.key_slots, static.key_valid),
            (padded.input_ids, padded.positions, padded.slot_mapping, padded.query_index, padded.query_valid,
             padded.key_slots, padded.key_valid),
        ):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        self.num_replays += 1
        return out[: shape.tokens]
