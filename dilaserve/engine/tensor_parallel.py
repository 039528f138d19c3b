"""Tensor-parallel instances: one engine, its model split over ``degree`` ranks.

Rank 0 lives in the engine's own process (the replica): it runs the scheduler, the sampler and
its shard of every forward. Ranks 1 .. degree - 1 are worker processes it starts and
supervises (``TensorParallelGroup``); each holds its shard and runs each step's forward in
lock-step with rank 0, the ranks meeting in two all-reduces a block (``torch.distributed``:
NCCL on GPUs, gloo on CPUs, where the CPU tests run it).

A step reaches the workers as bytes on a pipe: rank 0 packs the step's model inputs
(``StepInputs``) once, every worker unpacks them and runs the same forward code as rank 0
(eager or CUDA-graph replay, decided from the inputs alone, so all ranks agree). A pipe rather
than a collective: an idle worker blocks on it indefinitely without timing out, and sees the
end of the file when rank 0's process goes away.

On GPUs rank r uses ``cuda:r`` of the devices the process sees (a replica of degree N is given
N GPUs). A worker that dies fails the engine at its next step (``check``) or collective; the
replica then reports unhealthy and Serve replaces it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import struct
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.gpu.graphs import StepInputs
from dilaserve.models.base import DiffusionLM

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 120.0  # a collective a peer never joins fails after this long
CLOSE_TIMEOUT_S = 20.0  # how long closing waits for each teardown step
_STOP, _STEP, _SETUP = 0, 1, 2
_HEADER = struct.Struct("<9q")


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process is gone: the instance cannot compute another step."""


@dataclass(frozen=True)
class ModelSource:
    """Where every rank builds the same full model before taking its shard: a model directory
    (safetensors, as published) or a random model of a named shape (``random_model.SHAPES``)."""

    model_dir: str | None = None
    random_shape: str | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.random_shape is None):
            raise ValueError("a model source names exactly one of model_dir and random_shape")

    def spec(self):
        """The model's ``ModelSpec``, without its weights."""
        if self.random_shape is not None:
            from dilaserve.engine.random_model import SHAPES, spec_for_shape

            return spec_for_shape(SHAPES[self.random_shape])
        from dilaserve.models.registry import read_spec

        return read_spec(self.model_dir)

    def load(self, device: torch.device) -> DiffusionLM:
        dtype = getattr(torch, self.dtype)
        if self.random_shape is not None:
            from dilaserve.engine.random_model import SHAPES, build_model

            return build_model(SHAPES[self.random_shape], device, self.seed, dtype)
        from dilaserve.models.registry import load_model

        return load_model(self.model_dir, device=device, dtype=dtype)

    def load_shard(self, rank: int, degree: int, device: torch.device, all_reduce) -> DiffusionLM:
        """Rank ``rank``'s shard on ``device``. A checkpoint is split on the CPU before it
        moves (a rank's device never holds the full weights); a random model is drawn on the
        device (all ranks draw the same weights from the seed) and split there."""
        from dilaserve.models.tensor_parallel import shard_model

        if self.random_shape is not None or degree == 1:
            model = self.load(device)
            return shard_model(model, rank, degree, all_reduce) if degree > 1 else model
        model = shard_model(self.load(torch.device("cpu")), rank, degree, all_reduce)
        return model.to(device)


def rank_device(source: ModelSource, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if source.device == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t)
    return t


# -- the step message -------------------------------------------------------------------------
def pack_step(inputs: StepInputs, query_positions: torch.Tensor | None, causal_block_size: int,
              eager: bool, jobs=()) -> bytes:
    """One step's inputs (CPU tensors) as bytes: a header, the int64 arrays, the masks as bytes,
    then the sparse-KV selection jobs (each rank selects for its own heads).
    ``eager``: the step must not replay a CUDA graph (rank 0 decides from its plan)."""
    T = inputs.input_ids.shape[0]
    R, Q = inputs.query_index.shape
    L = inputs.key_slots.shape[1]
    longs = [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.query_index.reshape(-1),
             inputs.key_slots.reshape(-1)]
    if query_positions is not None:
        longs.append(query_positions.reshape(-1))
    ints = np.concatenate([t.numpy().astype(np.int64, copy=False) for t in longs])
    masks = np.concatenate([inputs.query_valid.reshape(-1).numpy(), inputs.key_valid.reshape(-1).numpy()])
    job_ints = np.asarray([v for job in jobs for v in (
        job.row_start, job.seq_len, job.block_start, job.block_end, job.keep, job.smoothing, len(job.dst_slots),
        *job.dst_slots.tolist())], dtype=np.int64)
    header = _HEADER.pack(_STEP, T, R, Q, L, causal_block_size, int(query_positions is not None), int(eager),
                          job_ints.size)
    return header + ints.tobytes() + masks.astype(np.uint8, copy=False).tobytes() + job_ints.tobytes()


def unpack_step(message: bytes) -> tuple[StepInputs, dict[str, Any], bool, list]:
    """The inverse of ``pack_step``: CPU tensors, the block-causal extras if any, ``eager``,
    the selection jobs."""
    from dilaserve.engine.sparse_kv import SelectionJob

    _, T, R, Q, L, causal, has_qpos, eager, n_job_ints = _HEADER.unpack_from(message)
    n_ints = 3 * T + R * Q + R * L + (R * Q if has_qpos else 0)
    ints = torch.from_numpy(np.frombuffer(message, dtype=np.int64, count=n_ints, offset=_HEADER.size).copy())
    n_masks = R * Q + R * L
    masks = torch.from_numpy(np.frombuffer(message, dtype=np.uint8, count=n_masks,
                                           offset=_HEADER.size + 8 * n_ints).copy())
    sizes = [T, T, T, R * Q, R * L] + ([R * Q] if has_qpos else [])
    parts = torch.split(ints, sizes)
    valid = masks.bool()
    inputs = StepInputs(parts[0], parts[1], parts[2], parts[3].view(R, Q), valid[: R * Q].view(R, Q),
                        parts[4].view(R, L), valid[R * Q:].view(R, L))
    extra = dict(query_positions=parts[5].view(R, Q), causal_block_size=causal) if has_qpos else {}
    job_ints = np.frombuffer(message, dtype=np.int64, count=n_job_ints, offset=_HEADER.size + 8 * n_ints + n_masks)
    jobs, i = [], 0
    while i < n_job_ints:
        row_start, seq_len, start, end, keep, smoothing, n_dst = (int(v) for v in job_ints[i:i + 7])
        dst = torch.from_numpy(job_ints[i + 7:i + 7 + n_dst].copy())
        jobs.append(SelectionJob(row_start, seq_len, start, end, keep, smoothing, dst))
        i += 7 + n_dst
    return inputs, extra, bool(eager), jobs


# -- rank 0's side ------------------------------------------------------------------------------
class TensorParallelGroup:
    """Rank 0's handle on the workers: starts them, sends them steps, watches them, stops them."""

    def __init__(self, degree: int, source: ModelSource, config: EngineConfig,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S):
        if degree < 2:
            raise ValueError(f"a tensor-parallel group has at least 2 ranks, got {degree}")
        if source.device == "cuda" and torch.cuda.device_count() < degree:
            raise ValueError(f"tensor parallel degree {degree} needs {degree} GPUs; this process sees "
                             f"{torch.cuda.device_count()}")
        self.degree, self.source = degree, source
        self.device = rank_device(source, 0)
        backend = "nccl" if source.device == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(1, degree):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"dilaserve-tp-rank{rank}", daemon=True,
                               args=(rank, degree, init_method, backend, source, config, theirs, timeout_s))
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        if torch.distributed.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        if source.device == "cuda":
            torch.cuda.set_device(self.device)
        torch.distributed.init_process_group(backend, init_method=init_method, rank=0, world_size=degree,
                                             timeout=timedelta(seconds=timeout_s))
        self._closed = False
        logger.info("tensor-parallel group of %d ranks (%s) started", degree, backend)

    all_reduce = staticmethod(_all_reduce)

    def setup(self, num_pages: int) -> None:
        """Tells the workers the KV pool size rank 0 chose; they build their runners."""
        self._send(_HEADER.pack(_SETUP, num_pages, 0, 0, 0, 0, 0, 0, 0))

    def send_step(self, inputs: StepInputs, extra: dict[str, Any], eager: bool, jobs=()) -> None:
        self.check()
        self._send(pack_step(inputs, extra.get("query_positions"), extra.get("causal_block_size", 0), eager, jobs))

    def _send(self, message: bytes) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(message)
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise WorkerDiedError(f"tensor-parallel rank {rank} is gone ({exc})") from exc

    def check(self) -> None:
        """Raises WorkerDiedError if a worker process has exited."""
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                raise WorkerDiedError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")

    def raise_if_died(self, cause: BaseException, wait_s: float = 2.0) -> None:
        """Called when a collective failed: if that is because a worker died (its exit may not
        be visible yet when the peer's socket already reset), raises WorkerDiedError naming the
        rank; returns after ``wait_s`` when every worker is still alive."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.check()
            except WorkerDiedError as died:
                raise died from cause
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stops the workers and leaves the process group; never hangs (a teardown that does
        not finish in time is logged and left behind)."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send_bytes(_HEADER.pack(_STOP, 0, 0, 0, 0, 0, 0, 0, 0))
            except OSError:
                pass
        # The workers leave the group as they stop; NCCL's teardown may wait for every rank,
        # so rank 0 leaves at the same time (in a thread, bounded), not after joining them.
        if torch.distributed.is_initialized():
            leaving = threading.Thread(target=torch.distributed.destroy_process_group, daemon=True)
            leaving.start()
            leaving.join(timeout=CLOSE_TIMEOUT_S)
            if leaving.is_alive():
                logger.warning("leaving the tensor-parallel process group did not finish in %.0f s", CLOSE_TIMEOUT_S)
        for proc in self._procs:
            proc.join(timeout=CLOSE_TIMEOUT_S)
            if proc.is_alive():
                logger.warning("tensor-parallel worker %d did not stop in %.0f s: killed", proc.pid, CLOSE_TIMEOUT_S)
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()


# -- the workers ----------------------------------------------------------------------------------
def worker_main(rank: int, degree: int, init_method: str, backend: str, source: ModelSource,
                config: EngineConfig, conn, timeout_s: float) -> None:
    """A worker's life: join the group, build the shard, then run the steps rank 0 sends."""
    from dilaserve.engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    device = rank_device(source, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // degree))
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=degree,
                                         timeout=timedelta(seconds=timeout_s))
    try:
        model = source.load_shard(rank, degree, device, _all_reduce)
        runner = None
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:  # rank 0's process is gone
                logger.warning("rank 0 went away; exiting")
                return
            command, value = _HEADER.unpack_from(message)[:2]
            if command == _STOP:
                return
            if command == _SETUP:
                runner = ModelRunner(model, value, config.page_size, config.kernels, config.cuda_graphs,
                                     sparse_scratch_tokens=config.sparse_scratch_tokens)
                continue
            inputs, extra, eager, jobs = unpack_step(message)
            with torch.no_grad():
                runner.forward_inputs(inputs, extra, eager, jobs)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
