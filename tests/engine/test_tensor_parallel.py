"""Tensor parallelism on CPU: the sharding arithmetic, the step message, and a real 2-process
gloo engine that decodes exactly what the unsharded engine decodes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine, build_engine
from dilaserve.engine.gpu.graphs import StepInputs
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.engine.sparse_kv import SelectionJob
from dilaserve.engine.tensor_parallel import ModelSource, WorkerDiedError, pack_step, unpack_step
from dilaserve.models.attention import DenseAttention
from dilaserve.models.checkpoint import make_random_checkpoint
from dilaserve.models.registry import load_model
from dilaserve.models.tensor_parallel import RowParallelLinear, check_degree, shard_model

FAMILIES = {
    # awkward shapes: grouped-query attention, biases (Dream), explicit head_dim and q/k norms (SDAR)
    "llada": dict(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=72, vocab_size=300),
    "dream": dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=72, vocab_size=300),
    "sdar": dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=72, vocab_size=300,
                 head_dim=16, block_size=4),
}


class ThreadAllReduce:
    """An all-reduce across ``degree`` threads (a barrier and a shared sum): runs every rank's
    shard in one process, so the sharding arithmetic is tested without process groups."""

    def __init__(self, degree: int):
        self.barrier = threading.Barrier(degree)
        self.lock = threading.Lock()
        self.parts: list[torch.Tensor] = []
        self.total: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(t.clone())
        if self.barrier.wait() == 0:
            self.total = torch.stack(self.parts).sum(0)
            self.parts = []
        self.barrier.wait()
        t.copy_(self.total)
        self.barrier.wait()
        return t


def _dense_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    batch, length = ids.shape
    positions = torch.arange(length).repeat(batch)
    attn = DenseAttention([length] * batch, positions=positions, causal_block_size=model.spec.causal_block_size)
    return model(ids.reshape(-1), positions, attn)


@pytest.mark.parametrize("family,degree", [("llada", 2), ("llada", 4), ("dream", 2), ("sdar", 2)])
def test_sharded_forward_equals_the_full_forward(tmp_path, family, degree):
    make_random_checkpoint(tmp_path, family, seed=3, **FAMILIES[family])
    full = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _dense_hidden(full, ids)
    reduce = ThreadAllReduce(degree)
    shards = [shard_model(load_model(tmp_path), r, degree, reduce) for r in range(degree)]
    # Each rank holds its share of every split weight, and only that.
    q = shards[0].get_submodule(next(n for n, _ in shards[0].named_modules() if n.endswith("q_proj")))
    assert q.weight.shape[0] * degree == full.get_submodule(
        next(n for n, _ in full.named_modules() if n.endswith("q_proj"))).weight.shape[0]
    assert sum(isinstance(m, RowParallelLinear) for m in shards[0].modules()) == 2 * full.spec.num_layers
    outputs: list = [None] * degree

    def run(rank):
        with torch.no_grad():
            outputs[rank] = _dense_hidden(shards[rank], ids)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(degree)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_degree_must_divide_heads_and_width(tmp_path):
    make_random_checkpoint(tmp_path, "dream", seed=0, **FAMILIES["dream"])
    spec = load_model(tmp_path).spec
    check_degree(spec, 2)
    with pytest.raises(ValueError, match="does not divide the model's 2 key-value heads"):
        check_degree(spec, 4)
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        check_degree(spec, 3)


def test_step_message_round_trip():
    g = torch.Generator().manual_seed(1)
    inputs = StepInputs(torch.randint(0, 99, (7,), generator=g), torch.arange(7), torch.randint(0, 50, (7,), generator=g),
                        torch.randint(0, 7, (3, 4), generator=g), torch.rand(3, 4, generator=g) > 0.5,
                        torch.randint(0, 50, (3, 9), generator=g), torch.rand(3, 9, generator=g) > 0.3)
    qpos = torch.randint(0, 30, (3, 4), generator=g)
    jobs = [SelectionJob(0, 5, 2, 4, 2, 3, torch.tensor([40, 41, 42])), SelectionJob(5, 2, 0, 1, 1, 1, torch.tensor([7]))]
    for extra_in, eager, sent_jobs in (({}, False, []), (dict(query_positions=qpos, causal_block_size=4), True, jobs)):
        got, extra, got_eager, got_jobs = unpack_step(pack_step(inputs, extra_in.get("query_positions"),
                                                                extra_in.get("causal_block_size", 0), eager, sent_jobs))
        assert got_eager is eager
        assert [(j.row_start, j.seq_len, j.block_start, j.block_end, j.keep, j.smoothing, j.dst_slots.tolist())
                for j in got_jobs] == [(j.row_start, j.seq_len, j.block_start, j.block_end, j.keep, j.smoothing,
                                        j.dst_slots.tolist()) for j in sent_jobs]
        for a, b in zip(got.__dict__.values(), inputs.__dict__.values()):
            assert a.dtype == b.dtype and torch.equal(a, b)
        if extra_in:
            assert torch.equal(extra["query_positions"], qpos) and extra["causal_block_size"] == 4
        else:
            assert extra == {}


def _decode(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add(engine.make_request(f"r{i}", p, params))
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.token_ids)
    return tokens


@pytest.mark.parametrize("family,retention", [("llada", None), ("dream", None), ("dream", 0.5)])
def test_two_process_gloo_engine_decodes_what_one_process_decodes(tmp_path, family, retention):
    make_random_checkpoint(tmp_path, family, seed=5, **FAMILIES[family])
    # With sparse KV each rank selects for its own heads, as one process does for all of them.
    config = EngineConfig(num_pages=64, page_size=4, max_batch_tokens=512, sparse_scratch_tokens=16)
    prompts = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((5, 11, 8))]
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.9, cache="dual", kv_retention=retention)
    reference = _decode(Engine(load_model(tmp_path), config), prompts, params)
    source = ModelSource(model_dir=str(tmp_path))
    engine = build_engine(source, EngineConfig(**{**config.__dict__, "tensor_parallel": 2}))
    try:
        assert engine.tp is not None and len(engine.tp.worker_pids()) == 1
        assert engine.runner.cache.k[0].shape[-2] * 2 == engine.spec.num_kv_heads
        got = _decode(engine, prompts, params)
    finally:
        engine.close()
    assert got == reference
    assert not torch.distributed.is_initialized()


def test_a_dead_worker_fails_the_engine_instead_of_hanging(tmp_path):
    make_random_checkpoint(tmp_path, "llada", seed=5, **FAMILIES["llada"])
    engine = build_engine(ModelSource(model_dir=str(tmp_path)),
                          EngineConfig(num_pages=64, page_size=4, tensor_parallel=2))
    try:
        params = SamplingParams(max_tokens=32, block_size=8, steps=32)  # one token a step: 32 steps
        engine.add(engine.make_request("a", [5, 6, 7], params))
        engine.step()
        engine.check_health()
        os.kill(engine.tp.worker_pids()[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                engine.check_health()
            except WorkerDiedError:
                break
            time.sleep(0.05)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            engine.check_health()
        assert engine.has_work()
        with pytest.raises(WorkerDiedError):
            engine.step()
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()


def test_a_step_racing_a_worker_death_names_the_dead_rank(tmp_path):
    """The step is sent before the worker's exit is visible: the collective then fails with a
    transport error, which the engine must still report as the death of rank 1."""
    make_random_checkpoint(tmp_path, "llada", seed=5, **FAMILIES["llada"])
    engine = build_engine(ModelSource(model_dir=str(tmp_path)),
                          EngineConfig(num_pages=64, page_size=4, tensor_parallel=2))
    try:
        params = SamplingParams(max_tokens=32, block_size=8, steps=32)
        engine.add(engine.make_request("a", [5, 6, 7], params))
        engine.step()
        os.kill(engine.tp.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            for _ in range(32):  # whichever step first notices, it names the rank
                engine.step()
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()
