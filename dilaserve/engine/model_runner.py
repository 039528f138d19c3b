"""The model runner: turns a step plan into one packed forward and per-request decisions.

All scheduled requests, whatever their lengths, phases and chunks, run in one forward over the
packed tokens. Logits are computed only for the queried positions (the logit budget), and
each request's unmasking strategy picks what to commit, with its own random generator so a
request decodes the same alone or in any batch.
"""

from __future__ import annotations

import time

import torch

from dilaserve.engine.gpu import select_fast_path
from dilaserve.engine.plan import Decision, StepOutput, StepPlan
from dilaserve.engine.request import Request
from dilaserve.generation.unmasking import choose_tokens, is_greedy_llada
from dilaserve.models.base import DiffusionLM
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache


class ModelRunner:
    def __init__(self, model: DiffusionLM, num_pages: int, page_size: int, kernels: str = "auto"):
        self.model = model
        self.spec = model.spec
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.page_size = page_size
        self.cache = PagedKVCache(
            self.spec.num_layers, num_pages, page_size, self.spec.num_kv_heads, self.spec.head_dim,
            self.dtype, self.device,
        )
        # Triton kernels on CUDA (attention + fused logit budget), else the pure-torch path.
        self.fast_path = select_fast_path(self.device, kernels)
        self.attention_cls = self.fast_path.attention if self.fast_path else PagedAttention
        self._generators: dict[str, torch.Generator] = {}
        self._slot_maps: dict[str, torch.Tensor] = {}

    def generator_for(self, request: Request) -> torch.Generator:
        gen = self._generators.get(request.request_id)
        if gen is None:
            seed = request.params.seed if request.params.seed is not None else hash(request.request_id) & 0x7FFFFFFF
            gen = self._generators[request.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._slot_maps.pop(request_id, None)

    def slot_map(self, request: Request) -> torch.Tensor:
        """Physical KV slot of every position of the request (its pages never change)."""
        slots = self._slot_maps.get(request.request_id)
        if slots is None:
            pos = torch.arange(request.seq_len)
            pages = torch.tensor(request.pages)
            slots = pages[pos // self.page_size] * self.page_size + pos % self.page_size
            self._slot_maps[request.request_id] = slots
        return slots

    def _build(self, plan: StepPlan):
        ids, positions, slots, key_slots, q_counts = [], [], [], [], []
        for item in plan.items:
            r = item.request
            all_slots = self.slot_map(r)
            ids.extend(r.canvas[item.compute_start:item.compute_end])
            positions.append(torch.arange(item.compute_start, item.compute_end))
            slots.append(all_slots[item.compute_start:item.compute_end])
            # Block-causal queries see nothing past their block, which ends the computed range.
            key_slots.append(all_slots[:item.compute_end] if self.spec.causal_block_size else all_slots)
            q_counts.append(item.num_tokens)
        num_req = len(plan.items)
        q_max, l_max = max(q_counts), max(len(k) for k in key_slots)
        q_lens = torch.tensor(q_counts)
        q_starts = torch.cumsum(q_lens, 0) - q_lens
        offs = torch.arange(q_max)
        query_valid = offs.unsqueeze(0) < q_lens.unsqueeze(1)
        query_index = torch.where(query_valid, q_starts.unsqueeze(1) + offs, 0)
        key_index = torch.zeros(num_req, l_max, dtype=torch.long)
        key_valid = torch.zeros(num_req, l_max, dtype=torch.bool)
        for i, ks in enumerate(key_slots):
            key_index[i, : len(ks)] = ks
            key_valid[i, : len(ks)] = True
        dev = self.device
        extra = {}
        if self.spec.causal_block_size:
            starts = torch.tensor([item.compute_start for item in plan.items])
            extra = dict(query_positions=(starts.unsqueeze(1) + offs).to(dev),
                         causal_block_size=self.spec.causal_block_size)
        attn = self.attention_cls(
            self.cache, torch.cat(slots).to(dev), query_index.to(dev), query_valid.to(dev),
            key_index.to(dev), key_valid.to(dev), **extra,
        )
        return (torch.tensor(ids, device=dev), torch.cat(positions).to(dev), attn, q_starts.tolist())

    @torch.no_grad()
    def run(self, plan: StepPlan) -> StepOutput:
        start_time = time.perf_counter()
        input_ids, positions, attn, q_starts = self._build(plan)
        hidden = self.model(input_ids, positions, attn)
        # Logit budget: rows for the queried positions only (shifted models read p - 1).
        shift = 1 if self.spec.shift_logits else 0
        rows, sizes = [], []
        for item, base in zip(plan.items, q_starts):
            rows.extend(base + max(p - shift, 0) - item.compute_start for p in item.query_positions)
            sizes.append(len(item.query_positions))
        hidden_rows = hidden[torch.tensor(rows, device=self.device)]
        unmaskers = [item.request.params.unmasker(item.request.threshold) for item in plan.items]
        # Greedy LLaDA-style rows share one argmax / softmax pass; the rest choose per request.
        greedy = [is_greedy_llada(u) for u in unmaskers]
        shared = logits = None
        if self.fast_path is not None and all(greedy):
            # Fused logit budget: (token, confidence) without a [rows, vocab] tensor.
            tokens_all, conf_all = self.fast_path.greedy_choices(
                hidden_rows, self.model.lm_head_weight(), self.spec.mask_token_id)
            shared = iter(zip(torch.split(tokens_all, sizes), torch.split(conf_all, sizes)))
        else:
            logits = self.model.compute_logits(hidden_rows).float()
            # The mask token is never a prediction: committing it would leave a position masked forever.
            logits[:, self.spec.mask_token_id] = -torch.inf
        if logits is not None and any(greedy):
            keep = torch.cat([torch.full((n,), g, dtype=torch.bool) for n, g in zip(sizes, greedy)]).to(self.device)
            tokens_all, conf_all = choose_tokens(logits[keep], 0.0, "low_confidence", None)
            shared = iter(zip(torch.split(tokens_all, [n for n, g in zip(sizes, greedy) if g]),
                              torch.split(conf_all, [n for n, g in zip(sizes, greedy) if g])))
        decisions = {}
        parts = torch.split(logits, sizes) if logits is not None else [None] * len(sizes)
        for item, part, unmasker, is_greedy in zip(plan.items, parts, unmaskers, greedy):
            r = item.request
            if is_greedy:
                tokens, confidence = next(shared)
                choice = unmasker.select_chosen(
                    tokens, confidence, step=r.step_in_block, num_masked_in_block=r.num_masked_at_block_start
                )
            else:
                choice = unmasker.select(
                    part, step=r.step_in_block, num_masked_in_block=r.num_masked_at_block_start,
                    generator=self.generator_for(r),
                )
            commit = choice.commit.nonzero().squeeze(1).tolist()
            tokens = choice.tokens.tolist()
            decisions[r.request_id] = Decision(
                tuple(item.query_positions[i] for i in commit), tuple(tokens[i] for i in commit)
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return StepOutput(decisions, time.perf_counter() - start_time)
