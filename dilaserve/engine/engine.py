"""The engine of a replica: ``EngineCore``'s step loop driving the model runner.

The loop, intake, predictions and statistics are in ``core.py`` (torch-free, shared with the
simulator); this adds what needs the model: the KV pool sized from memory and the runner.
"""

from __future__ import annotations

import time

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.core import EngineCore
from dilaserve.engine.memory import StepMemoryModel
from dilaserve.engine.model_runner import ModelRunner
from dilaserve.models.base import DiffusionLM
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache


def num_pages_for(config: EngineConfig, model: DiffusionLM) -> int:
    if config.num_pages is not None:
        return config.num_pages
    spec, dtype = model.spec, next(model.parameters()).dtype
    per_page = PagedKVCache.bytes_per_page(spec.num_layers, config.page_size, spec.num_kv_heads, spec.head_dim, dtype)
    return max(1, int(config.kv_memory_gib * 2**30 // per_page))


class Engine(EngineCore):
    def __init__(self, model: DiffusionLM, config: EngineConfig | None = None, clock=time.monotonic):
        config = config or EngineConfig()
        num_pages = num_pages_for(config, model)
        runner = ModelRunner(model, num_pages, config.page_size, config.kernels, config.cuda_graphs)
        memory = StepMemoryModel.for_spec(
            model.spec, next(model.parameters()).element_size(), fused_logits=runner.fast_path is not None,
            padded_attention=runner.attention_cls is PagedAttention)
        super().__init__(model.spec, config, runner, num_pages, clock, memory=memory)
        self.model = model
