"""The engine of a replica: ``EngineCore``'s step loop driving the model runner.

The loop, intake, predictions and statistics are in ``core.py`` (torch-free, shared with the
simulator); this adds what needs the model: the KV pool sized from memory and the runner.
``build_engine`` makes one from a model source, tensor-parallel when the config says so.
"""

from __future__ import annotations

import time

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.core import EngineCore
from dilaserve.engine.memory import StepMemoryModel
from dilaserve.engine.model_runner import ModelRunner
from dilaserve.engine.tensor_parallel import ModelSource, TensorParallelGroup, rank_device
from dilaserve.models.base import DiffusionLM
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache
from dilaserve.models.tensor_parallel import check_degree, degree_of, local_kv_heads


def num_pages_for(config: EngineConfig, model: DiffusionLM) -> int:
    """KV pages from ``kv_memory_gib`` per device (a tensor-parallel rank caches its own heads)."""
    if config.num_pages is not None:
        return config.num_pages
    spec, dtype = model.spec, next(model.parameters()).dtype
    per_page = PagedKVCache.bytes_per_page(spec.num_layers, config.page_size, local_kv_heads(spec, degree_of(model)),
                                           spec.head_dim, dtype)
    return max(1, int(config.kv_memory_gib * 2**30 // per_page))


class Engine(EngineCore):
    """``tp``: the tensor-parallel group when ``model`` is rank 0's shard (see ``build_engine``)."""

    def __init__(self, model: DiffusionLM, config: EngineConfig | None = None, clock=time.monotonic,
                 tp: TensorParallelGroup | None = None):
        config = config or EngineConfig()
        num_pages = num_pages_for(config, model)
        if tp is not None:
            tp.setup(num_pages)
        runner = ModelRunner(model, num_pages, config.page_size, config.kernels, config.cuda_graphs, tp=tp,
                             sparse_scratch_tokens=config.sparse_scratch_tokens)
        memory = StepMemoryModel.for_spec(
            model.spec, next(model.parameters()).element_size(), fused_logits=runner.fast_path is not None,
            padded_attention=runner.attention_cls is PagedAttention, block_ops=runner.block_ops)
        super().__init__(model.spec, config, runner, num_pages, clock, memory=memory)
        self.model = model
        self.tp = tp

    def check_health(self) -> None:
        """Raises if the instance cannot step (a tensor-parallel worker died)."""
        if self.tp is not None:
            self.tp.check()

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any."""
        if self.tp is not None:
            self.tp.close()


def build_engine(source: ModelSource, config: EngineConfig | None = None, clock=time.monotonic) -> Engine:
    """An engine for ``source``'s model over ``config.tensor_parallel`` ranks: rank 0 in this
    process, the others in worker processes it supervises."""
    config = config or EngineConfig()
    degree = config.tensor_parallel
    if degree == 1:
        return Engine(source.load(rank_device(source, 0)), config, clock)
    check_degree(source.spec(), degree)
    group = TensorParallelGroup(degree, source, config)
    try:
        model = source.load_shard(0, degree, group.device, group.all_reduce)
        return Engine(model, config, clock, tp=group)
    except BaseException:
        group.close()
        raise

