"""The model runner: turns a step plan into one packed forward and per-request decisions.

All scheduled requests, whatever their lengths, phases and chunks, run in one forward over the
packed tokens. Logits are computed only for the queried positions (the logit budget), and
each request's unmasking strategy picks what to commit, with its own random generator so a
request decodes the same alone or in any batch.
"""

from __future__ import annotations

import dataclasses
import time
from array import array

import torch

from dilaserve.engine.gpu import select_fast_path
from dilaserve.engine.gpu.graphs import ReuseGraphs, StepInputs
from dilaserve.engine.plan import Decision, StepOutput, StepPlan
from dilaserve.engine.request import Request
from dilaserve.generation.unmasking import choose_tokens, is_greedy_llada, select_chosen_batch
from dilaserve.models.base import DiffusionLM
from dilaserve.models.packing import pack_projections
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache
from dilaserve.models.tensor_parallel import degree_of, local_kv_heads


class ModelRunner:
    """``tp``: on rank 0 of a tensor-parallel instance, the group its steps are sent to (the
    model is then rank 0's shard: ``model.tensor_parallel`` = (rank, degree))."""

    def __init__(self, model: DiffusionLM, num_pages: int, page_size: int, kernels: str = "auto",
                 cuda_graphs: bool = True, tp=None, sparse_scratch_tokens: int = 0):
        self.model = model
        self.spec = model.spec
        self.tp = tp
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.page_size = page_size
        # Triton kernels on CUDA (attention + fused logit budget), else the pure-torch path.
        self.fast_path = select_fast_path(self.device, kernels)
        self.attention_cls = self.fast_path.attention if self.fast_path else PagedAttention
        # Reuse steps (every step of a block-causal model) replay CUDA graphs on the fast path;
        # padding tokens write a scratch page past the pool the allocator hands out.
        use_graphs = cuda_graphs and self.fast_path is not None and self.device.type == "cuda"
        # Sparse-KV refreshes keep prompts' keys and values in scratch slots past the pool (and
        # past the graphs' scratch page) for the step only.
        scratch_pages = -(-sparse_scratch_tokens // page_size)
        self.sparse_scratch_base = (num_pages + (1 if use_graphs else 0)) * page_size
        self.cache = PagedKVCache(
            self.spec.num_layers, num_pages + (1 if use_graphs else 0) + scratch_pages, page_size,
            local_kv_heads(self.spec, degree_of(model)), self.spec.head_dim, self.dtype, self.device,
        )
        self.block_ops = self.fast_path.block_ops if self.fast_path else None
        if self.block_ops is not None:  # q|k|v and gate|up as one matmul each (memory-neutral views)
            pack_projections(model, interleave_pairs=self.block_ops.interleave_gate_up)
        self.graphs = ReuseGraphs(model, self.cache, self.attention_cls, num_pages * page_size,
                                  self.spec.mask_token_id, ops=self.block_ops,
                                  causal_block_size=self.spec.causal_block_size) if use_graphs else None
        self._generators: dict[str, torch.Generator] = {}
        self._key_layouts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def generator_for(self, request: Request) -> torch.Generator:
        gen = self._generators.get(request.request_id)
        if gen is None:
            seed = request.params.seed if request.params.seed is not None else hash(request.request_id) & 0x7FFFFFFF
            gen = self._generators[request.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _build(self, plan: StepPlan):
        """The step's packed model inputs, made by a fixed number of tensor ops whatever the
        batch size: per request, Python only appends to lists (ids, positions, page tables).
        Returns the inputs on the CPU, the extra arguments of block-causal attention, and the
        sparse-KV selections of the step's refreshes."""
        items = plan.items
        ids: list[int] = []
        positions: list[int] = []
        owners: list[int] = []
        q_counts, key_lens, tables = [], [], []
        for i, item in enumerate(items):
            r = item.request
            ids.extend(r.canvas[item.compute_start:item.compute_end])
            positions.extend(range(item.compute_start, item.compute_end))
            owners.extend([i] * item.num_tokens)
            q_counts.append(item.num_tokens)
            # Block-causal queries see nothing past their block, which ends the computed range.
            key_lens.append(item.compute_end if self.spec.causal_block_size else r.seq_len)
            tables.append(r.pages)
        num_req, num_tokens = len(items), len(ids)
        q_max, l_max = max(q_counts), max(key_lens)
        packed = _int_tensor(ids + positions + owners).view(3, num_tokens)
        # key_index[r, j]: the slot of request r's position j (page tables padded with page 0,
        # whose slots padded keys name but never read: key_valid masks them).
        num_pages = max(len(t) for t in tables)
        page_table = torch.tensor([t + [0] * (num_pages - len(t)) for t in tables])
        sparse = [i for i, item in enumerate(items) if item.request.params.is_sparse_kv]
        if sparse:  # some keys are not positions 0 .. n - 1: see _sparse_keys
            key_index, key_lens, slots, jobs = self._sparse_keys(items, sparse, page_table, key_lens, packed)
            l_max = max(key_lens)
        else:
            page_of_key, offset_in_page = self._key_layout(l_max)
            key_index = page_table.index_select(1, page_of_key).mul_(self.page_size).add_(offset_in_page)
            slots = key_index[packed[2], packed[1]]
            jobs = []
        if all(n == l_max for n in key_lens):
            key_valid = torch.ones(num_req, l_max, dtype=torch.bool)
        else:
            key_valid = torch.arange(l_max).unsqueeze(0) < torch.tensor(key_lens).unsqueeze(1)
        # Each request's queries are a run of the packed tokens, in request order.
        if all(n == q_max for n in q_counts):
            query_index = torch.arange(num_tokens).view(num_req, q_max)
            query_valid = torch.ones(num_req, q_max, dtype=torch.bool)
        else:
            q_lens = torch.tensor(q_counts)
            offs = torch.arange(q_max)
            query_valid = offs.unsqueeze(0) < q_lens.unsqueeze(1)
            query_index = torch.where(query_valid, (torch.cumsum(q_lens, 0) - q_lens).unsqueeze(1) + offs, 0)
        extra = {}
        if self.spec.causal_block_size:
            starts = torch.tensor([item.compute_start for item in items])
            extra = dict(query_positions=starts.unsqueeze(1) + torch.arange(q_max),
                         causal_block_size=self.spec.causal_block_size)
        return StepInputs(packed[0], packed[1], slots, query_index, query_valid, key_index, key_valid), extra, jobs

    def _sparse_keys(self, items, sparse: list[int], page_table: torch.Tensor, key_lens: list[int],
                     packed: torch.Tensor):
        """Key slots when some requests use sparse KV. A sparse request's pages hold its
        positions from ``kv_offset`` on (logical index = position - kv_offset), then its sparse
        region; positions below ``kv_offset`` get scratch slots in the refresh steps that
        compute them. A sparse reuse step reads the region's first ``sparse_count`` slots and
        the window; a refresh, every position; a dense request, positions 0 .. n - 1.
        Returns (key_index [R, L], key lengths, the packed tokens' slots, selection jobs of the
        step's sparse refreshes)."""
        from dilaserve.engine.sparse_kv import SelectionJob

        is_sparse = set(sparse)
        extent = max(items[i].request.kv_tokens if i in is_sparse else key_lens[i] for i in range(len(items)))
        page_of_key, offset_in_page = self._key_layout(extent)
        dense = page_table.index_select(1, page_of_key).mul_(self.page_size).add_(offset_in_page)
        key_rows, token_slots, jobs = [], [], []
        scratch, row_start = self.sparse_scratch_base, 0
        for i, item in enumerate(items):
            r = item.request
            if i not in is_sparse:
                key_rows.append(dense[i, :key_lens[i]])
                token_slots.append(dense[i, item.compute_start:item.compute_end])
            else:
                off, base = r.kv_offset, r.seq_len - r.kv_offset
                transient = torch.arange(scratch, scratch + item.num_transient_tokens)
                scratch += item.num_transient_tokens
                if item.uses_sparse_kv:
                    ws, we = r.sparse_window
                    key_rows.append(torch.cat((dense[i, base:base + r.sparse_count], dense[i, ws - off:we - off])))
                else:  # a refresh: the whole sequence
                    key_rows.append(torch.cat((transient, dense[i, :base])))
                lo, hi = item.compute_start, item.compute_end
                token_slots.append(torch.cat((transient[lo:min(hi, off)], dense[i, max(lo, off) - off:hi - off])))
                if item.is_refresh:
                    jobs.append(SelectionJob(row_start, r.seq_len, *r.sparse_window, r.sparse_keep(),
                                             r.params.kv_smoothing, dense[i, base:base + r.sparse_capacity]))
            row_start += item.num_tokens
        key_index = torch.nn.utils.rnn.pad_sequence(key_rows, batch_first=True)
        return key_index, [len(k) for k in key_rows], torch.cat(token_slots), jobs

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        inputs, extra, jobs = self._build(plan)
        eager = any(_is_large(item) for item in plan.items)  # large steps: launches do not matter, no graphs
        if self.tp is None:
            return self.forward_inputs(inputs, extra, eager, jobs)
        self.tp.send_step(inputs, extra, eager, jobs)
        try:
            return self.forward_inputs(inputs, extra, eager, jobs)
        except Exception as exc:  # a collective broke: say which rank died, if one did
            self.tp.raise_if_died(exc)
            raise

    def forward_inputs(self, inputs: StepInputs, extra: dict, eager: bool, jobs=()) -> torch.Tensor:
        """Hidden states of the packed tokens (``inputs`` on the CPU): from a CUDA graph when
        one applies and ``eager`` is off, else eagerly. Tensor-parallel workers run each step
        through here with rank 0's inputs, so every rank takes the same path."""
        if self.graphs is not None and not eager:
            hidden = self.graphs.run(inputs)
            if hidden is not None:
                return hidden
        dev = inputs.to(self.device)
        if extra:
            extra = dict(extra, query_positions=extra["query_positions"].to(self.device))
        attn = self.attention_cls(self.cache, dev.slot_mapping, dev.query_index, dev.query_valid,
                                  dev.key_slots, dev.key_valid, **extra)
        if jobs:  # sparse-KV refreshes: each layer also selects what each head keeps
            from dilaserve.engine.sparse_kv import SparseSelectingAttention

            jobs = [dataclasses.replace(job, dst_slots=job.dst_slots.to(self.device)) for job in jobs]
            attn = SparseSelectingAttention(attn, self.cache, jobs)
        return self.model(dev.input_ids, dev.positions, attn, self.block_ops)

    def _key_layout(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset in page) of positions 0 .. length - 1, kept per length."""
        layout = self._key_layouts.get(length)
        if layout is None:
            pos = torch.arange(length)
            layout = self._key_layouts[length] = (pos // self.page_size, pos % self.page_size)
        return layout

    def _query_rows(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
        """Packed rows whose hidden states give the queried positions' logits (the logit
        budget; shifted models read position p from p - 1), and each request's count."""
        positions: list[int] = []
        offsets: list[int] = []
        sizes = []
        base = 0
        for item in plan.items:
            n = len(item.query_positions)
            positions.extend(item.query_positions)
            offsets.extend([base - item.compute_start] * n)
            sizes.append(n)
            base += item.num_tokens
        positions_and_offsets = _int_tensor(positions + offsets).view(2, len(positions))
        rows = positions_and_offsets[0]
        if self.spec.shift_logits:
            rows = (rows - 1).clamp_(min=0)
        return (rows + positions_and_offsets[1]).to(self.device), sizes

    def _greedy_commits(self, requests: list[Request], unmaskers, tokens: torch.Tensor, confidence: torch.Tensor,
                        sizes: list[int]) -> tuple[list[list[bool]], list[list[int]]]:
        """Commits of the greedy requests, whose (token, confidence) rows are packed in
        ``tokens`` / ``confidence``: one padded [requests, queries] selection for all of them."""
        q_max = max(sizes)
        if all(n == q_max for n in sizes):
            tokens, confidence = tokens.view(len(sizes), q_max), confidence.view(len(sizes), q_max)
        else:
            counts = torch.tensor(sizes, device=tokens.device)
            offs = torch.arange(q_max, device=tokens.device)
            valid = offs.unsqueeze(0) < counts.unsqueeze(1)
            index = torch.where(valid, (torch.cumsum(counts, 0) - counts).unsqueeze(1) + offs, 0)
            tokens = tokens[index]
            confidence = confidence[index].masked_fill(~valid, -torch.inf)
        commit = select_chosen_batch(
            unmaskers, confidence, sizes, steps=[r.step_in_block for r in requests],
            num_masked_in_block=[r.num_masked_at_block_start for r in requests],
        )
        return commit.tolist(), tokens.tolist()

    @torch.no_grad()
    def run(self, plan: StepPlan) -> StepOutput:
        start_time = time.perf_counter()
        hidden = self._forward(plan)
        rows, sizes = self._query_rows(plan)
        hidden_rows = hidden.index_select(0, rows)
        items = plan.items
        unmaskers = [item.request.params.unmasker(item.request.threshold) for item in items]
        # Greedy LLaDA-style rows share one argmax / softmax pass and one selection; the rest
        # choose per request, with their own generators.
        greedy = [is_greedy_llada(u) for u in unmaskers]
        greedy_idx = [i for i, g in enumerate(greedy) if g]
        logits = tokens_all = conf_all = None
        if self.fast_path is not None and len(greedy_idx) == len(items):
            # Fused logit budget: (token, confidence) without a [rows, vocab] tensor.
            tokens_all, conf_all = self.fast_path.greedy_choices(
                hidden_rows, self.model.lm_head_weight(), self.spec.mask_token_id)
        else:
            logits = self.model.compute_logits(hidden_rows).float()
            # The mask token is never a prediction: committing it would leave a position masked forever.
            logits[:, self.spec.mask_token_id] = -torch.inf
            if len(greedy_idx) == len(items):
                tokens_all, conf_all = choose_tokens(logits, 0.0, "low_confidence", None)
            elif greedy_idx:
                keep = torch.repeat_interleave(torch.tensor(greedy, device=self.device),
                                               torch.tensor(sizes, device=self.device))
                tokens_all, conf_all = choose_tokens(logits[keep], 0.0, "low_confidence", None)
        chosen = {}
        if greedy_idx:
            commits, token_rows = self._greedy_commits(
                [items[i].request for i in greedy_idx], [unmaskers[i] for i in greedy_idx], tokens_all, conf_all,
                [sizes[i] for i in greedy_idx])
            chosen = dict(zip(greedy_idx, zip(commits, token_rows)))
        parts = torch.split(logits, sizes) if logits is not None and len(greedy_idx) < len(items) else None
        decisions = {}
        for i, item in enumerate(items):
            r = item.request
            if i in chosen:
                commit, tokens = chosen[i]
            else:
                choice = unmaskers[i].select(
                    parts[i], step=r.step_in_block, num_masked_in_block=r.num_masked_at_block_start,
                    generator=self.generator_for(r),
                )
                commit, tokens = choice.commit.tolist(), choice.tokens.tolist()
            picked = [j for j, c in enumerate(commit[:len(item.query_positions)]) if c]
            decisions[r.request_id] = Decision(
                tuple(item.query_positions[j] for j in picked), tuple(tokens[j] for j in picked)
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return StepOutput(decisions, time.perf_counter() - start_time)


def _int_tensor(values: list[int]) -> torch.Tensor:
    """A 1-D int64 tensor of Python ints, made through an ``array``: ~10x faster than
    ``torch.tensor`` on the list, which a batched step's thousands of tokens make count (the
    tensor keeps the array alive)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64) if values else torch.zeros(0, dtype=torch.int64)


def _is_large(item) -> bool:
    """A refresh, or an exact-cache prefill (a prompt plus its first block): steps that run
    eagerly, so that graphs are captured only for the many small steps of one shape family."""
    if item.is_refresh:
        return True
    return item.request.params.cache == "exact" and item.num_tokens > 2 * item.request.params.block_size
