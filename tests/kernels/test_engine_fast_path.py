"""With the Triton kernels in the model runner, the engine decodes as on the torch path."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.models.paged_attention import PagedAttention
from tests.engine.helpers import make_prompts, new_engine, run_to_completion

triton = pytest.importorskip("triton")

from dilaserve.engine.gpu import FastPath, fast_block_ops, select_fast_path  # noqa: E402
from dilaserve.engine.gpu.attention import TritonPagedAttention  # noqa: E402
from dilaserve.engine.gpu.logits import greedy_choices  # noqa: E402
from dilaserve.models.packing import pack_projections  # noqa: E402
from kernels import fused  # noqa: E402
from kernels.interpreter import interpreting  # noqa: E402


def _engine(model, fast: bool):
    engine = new_engine(model)
    runner = engine.runner
    if not hasattr(runner, "attention_cls"):
        pytest.skip("the model runner has no kernel hook yet (dilaserve/engine/gpu/engine_hook.patch)")
    if fast:  # on CPU the kernels run in the Triton interpreter
        ops = fast_block_ops()
        runner.fast_path = FastPath(TritonPagedAttention, greedy_choices, ops)
        runner.attention_cls = TritonPagedAttention
        runner.block_ops = ops
    else:
        runner.fast_path = None
        runner.attention_cls = PagedAttention
        runner.block_ops = None
    return engine


@pytest.mark.parametrize("decoding", [dict(steps=4), dict(threshold=0.8)])
def test_triton_path_matches_torch_path(llada, device, decoding):
    model = copy.deepcopy(llada).to(device)
    prompts = make_prompts(3, seed=7, lo=3, hi=11)
    params = SamplingParams(max_tokens=16, block_size=8, cache="dual", **decoding)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    torch_path = run_to_completion(_engine(model, fast=False), requests)
    triton_path = run_to_completion(_engine(model, fast=True), requests)
    assert {k: v[0] for k, v in triton_path.items()} == {k: v[0] for k, v in torch_path.items()}


@pytest.mark.parametrize("variant", ["default", "composed", "mm-add", "bf16-qkv", "swiglu", "swiglu-tma-persistent",
                                     "swiglu-il-2048", "all"])
def test_large_step_variants_decode_the_same_tokens(llada, device, variant, monkeypatch):
    """Each way of running steps above 32 rows (matmul.VARIANTS) decodes as the torch path; the
    steps here (refreshes of 3 requests, ~80 rows) take those paths."""
    from dilaserve.engine.gpu import matmul

    monkeypatch.setattr(matmul, "OPTIONS", matmul.VARIANTS[variant])
    model = copy.deepcopy(llada).to(device)
    pack_projections(model)  # as the runner does on a GPU (the torch path runs the members)
    prompts = make_prompts(3, seed=9, lo=12, hi=20)
    params = SamplingParams(max_tokens=16, block_size=8, cache="dual", steps=4)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    torch_path = run_to_completion(_engine(model, fast=False), requests)
    engine = new_engine(model, kernels="triton")  # the runner builds its fast path (and packs) itself
    if matmul.OPTIONS.swiglu_kernel:
        calls = []
        real = engine.runner.block_ops.linear_swiglu
        engine.runner.block_ops = dataclasses.replace(
            engine.runner.block_ops, linear_swiglu=lambda x, w, **kw: calls.append(x.shape[0]) or real(x, w, **kw))
        engine.runner.fast_path = dataclasses.replace(engine.runner.fast_path, block_ops=engine.runner.block_ops)
    triton_path = run_to_completion(engine, requests)
    assert {k: v[0] for k, v in triton_path.items()} == {k: v[0] for k, v in torch_path.items()}
    if matmul.OPTIONS.swiglu_kernel:
        assert any(rows > matmul.SKINNY_MAX_ROWS for rows in calls)  # the kernel ran on the large steps
    from dilaserve.models.packing import _PACKS

    groups = {pack.group for pack in _PACKS.values() if pack.members[0] in set(model.modules())}
    assert groups == ({0, 1} if matmul.OPTIONS.interleave_gate_up else {0})  # gate | up interleaved or not


def test_block_causal_model_on_the_triton_path(sdar, device):
    """SDAR (exact cache, block-causal) through the kernel's block-causal mask: same tokens."""
    model = copy.deepcopy(sdar).to(device)
    prompts = make_prompts(3, seed=8, lo=2, hi=9)
    block = model.spec.causal_block_size
    params = SamplingParams(max_tokens=3 * block, block_size=block, cache="exact", threshold=0.7)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    torch_path = run_to_completion(_engine(model, fast=False), requests)
    triton_path = run_to_completion(_engine(model, fast=True), requests)
    assert {k: v[0] for k, v in triton_path.items()} == {k: v[0] for k, v in torch_path.items()}
    assert all(len(v[0]) > 0 for v in torch_path.values())


def test_selection():
    assert select_fast_path(torch.device("cpu")) is None
    assert select_fast_path(torch.device("cuda"), "torch") is None
    with pytest.raises(ValueError):
        select_fast_path(torch.device("cpu"), "fast")
    if interpreting():
        assert select_fast_path(torch.device("cpu"), "triton").attention is TritonPagedAttention
    else:
        with pytest.raises(RuntimeError):
            select_fast_path(torch.device("cpu"), "triton")
    if torch.cuda.is_available():
        assert select_fast_path(torch.device("cuda")).attention is TritonPagedAttention
        assert select_fast_path(torch.device("cuda")).block_ops.rotary is fused.rotary


def test_gpus_without_tensor_descriptors_take_the_composed_swiglu(monkeypatch):
    """Before Hopper (no TMA) the fast path leaves the interleaved TMA SwiGLU for cuBLAS +
    silu_mul in order; on Hopper, on CPU (the interpreter) and for no device, OPTIONS stand."""
    from dilaserve.engine.gpu import matmul

    assert matmul.OPTIONS.swiglu_kernel and matmul.OPTIONS.interleave_gate_up  # the default
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    ampere = matmul.options_for(torch.device("cuda"))
    assert (ampere.swiglu_kernel, ampere.interleave_gate_up, ampere.mlp_chunk_tokens) == (False, False, None)
    assert ampere.add_in_gemm == matmul.OPTIONS.add_in_gemm  # the rest stands
    assert not fast_block_ops(torch.device("cuda")).interleave_gate_up
    assert fast_block_ops(torch.device("cuda")).linear_swiglu is None
    capability["value"] = (9, 0)
    assert matmul.options_for(torch.device("cuda")) is matmul.OPTIONS
    assert matmul.options_for(torch.device("cpu")) is matmul.OPTIONS
    assert matmul.options_for(None) is matmul.OPTIONS
