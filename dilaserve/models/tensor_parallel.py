"""Tensor parallelism for the model families: which weights split how, and the split itself.

Megatron-style, per transformer block: the query, key, value, gate and up projections are
split by output rows (column parallel: each rank computes its own heads and its own slice of
the MLP's hidden width), the attention output and down projections by input columns (row
parallel: each rank's partial product, summed across ranks by one all-reduce). Two all-reduces
a block; everything else (embedding, norms, the LM head) is replicated. Heads stay whole, so a
degree must divide the query and the key-value head counts.

``shard_model`` turns a full model into rank ``r``'s shard in place; the caller supplies the
all-reduce (``torch.distributed`` with NCCL on GPUs, gloo on CPUs). The model code is not
touched: a block infers its local head count from the projections' widths.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dilaserve.models.spec import ModelSpec

# Per family: (column-parallel module patterns, row-parallel module patterns), as state-dict
# module paths. LLaDA's ``transformer.ff_out`` (no block index) is its LM head: replicated.
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llada": (
        ("model.transformer.blocks.*.q_proj", "model.transformer.blocks.*.k_proj",
         "model.transformer.blocks.*.v_proj", "model.transformer.blocks.*.ff_proj",
         "model.transformer.blocks.*.up_proj"),
        ("model.transformer.blocks.*.attn_out", "model.transformer.blocks.*.ff_out"),
    ),
    "dream": (
        ("model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.k_proj", "model.layers.*.self_attn.v_proj",
         "model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj"),
        ("model.layers.*.self_attn.o_proj", "model.layers.*.mlp.down_proj"),
    ),
}
LAYOUTS["sdar"] = LAYOUTS["dream"]  # Qwen3 names; its q/k norms act per head: replicated

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def check_degree(spec: ModelSpec, degree: int) -> None:
    """Raises ValueError unless ``degree`` ranks can split ``spec``'s heads and MLP evenly."""
    if degree < 1:
        raise ValueError(f"tensor parallel degree must be >= 1, got {degree}")
    if spec.model_type.lower() not in LAYOUTS:
        raise ValueError(f"tensor parallelism is not implemented for model type {spec.model_type!r}")
    for what, count in (("attention heads", spec.num_heads), ("key-value heads", spec.num_kv_heads),
                        ("MLP hidden width", spec.intermediate_size)):
        if count % degree:
            raise ValueError(f"tensor parallel degree {degree} does not divide the model's {count} {what}")


def local_kv_heads(spec: ModelSpec, degree: int) -> int:
    """Key-value heads each rank holds (and caches)."""
    return spec.num_kv_heads // degree


def degree_of(model: nn.Module) -> int:
    """Ranks ``model`` is one shard of (1 for a whole model; see ``shard_model``)."""
    return getattr(model, "tensor_parallel", (0, 1))[1]


class RowParallelLinear(nn.Module):
    """A linear layer holding a slice of the input columns; its partial products are summed
    across ranks (the bias, if any, added once after the sum)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, all_reduce: AllReduce):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def _split(t: torch.Tensor, dim: int, rank: int, degree: int) -> torch.Tensor:
    size = t.shape[dim] // degree
    return t.narrow(dim, rank * size, size).contiguous()


def _matching(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def shard_model(model: nn.Module, rank: int, degree: int, all_reduce: AllReduce) -> nn.Module:
    """Rank ``rank``'s shard of ``model`` (in place; the full weights are freed as they are
    split). ``model.tensor_parallel`` records ``(rank, degree)``."""
    spec: ModelSpec = model.spec
    check_degree(spec, degree)
    if not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is outside [0, {degree})")
    column, row = LAYOUTS[spec.model_type.lower()]
    names_col, names_row = _matching(model, column), _matching(model, row)
    if len(names_col) != 5 * spec.num_layers or len(names_row) != 2 * spec.num_layers:
        raise ValueError(f"{type(model).__name__}: its modules do not match the {spec.model_type} layout "
                         f"({len(names_col)} column, {len(names_row)} row)")
    with torch.no_grad():
        for name in names_col:
            m: nn.Linear = model.get_submodule(name)
            m.weight = nn.Parameter(_split(m.weight.data, 0, rank, degree), requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(_split(m.bias.data, 0, rank, degree), requires_grad=False)
            m.out_features = m.weight.shape[0]
        for name in names_row:
            m = model.get_submodule(name)
            parent_name, _, attr = name.rpartition(".")
            replacement = RowParallelLinear(_split(m.weight.data, 1, rank, degree),
                                            None if m.bias is None else m.bias.data, all_reduce)
            setattr(model.get_submodule(parent_name), attr, replacement)
    model.tensor_parallel = (rank, degree)
    return model
