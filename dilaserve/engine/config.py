"""Engine settings (plain frozen dataclass; the serving layer validates what users write)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 8192  # token-forwards per step, refresh and reuse together
    # Refresh tokens per step: heavy full-sequence refreshes of different requests are spread
    # over steps instead of landing together (phase-mixed batching). The first refresh of a
    # step is always allowed, so a long prompt cannot starve.
    max_refresh_tokens: int = 4096
    max_running: int = 256  # requests decoding at once
    max_waiting: int = 4096  # queued requests before add_request refuses
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pool size; None: derived from kv_memory_gib
    kv_memory_gib: float = 1.0
    # "fixed": at most max_refresh_tokens refresh tokens per step. "auto": from the cost model (a
    # latency profile): a step's refresh work may add at most refresh_slowdown x the predicted
    # time of its reuse part (and still at most max_refresh_tokens). See scheduler.py.
    refresh_bound: str = "fixed"
    refresh_slowdown: float = 1.0  # "auto" refresh bound: allowed extra step time, x the reuse part
    # Transient memory a step may use (activations, attention, logits; memory.py), GiB; None: no cap.
    step_memory_gib: float | None = None
    chunk_control: str = "fixed"  # how chunk sizes are chosen: "fixed" or "adaptive" (chunk_control.py)
    # A latency profile (``dilaserve profile latency`` JSON): the cost model's step cost, used as
    # measured (not refitted online); the adaptive chunk controller and "auto" bound read it.
    latency_profile: str | None = None
    # An acceptance profile (``dilaserve profile acceptance`` JSON): the adaptive chunk
    # controller's prior for tokens decided per step at each chunk size.
    acceptance_profile: str | None = None
    default_threshold: float = 0.9
    threshold_step: float = 0.1  # load control lowers a late request's threshold by this
    load_control: bool = False  # lower thresholds of late requests down to their floor
    # "auto": Triton kernels (paged attention, fused logit budget) on CUDA when triton imports;
    # "torch": the pure-torch reference path everywhere; "triton": require the kernels.
    kernels: str = "auto"
    # Replay reuse steps from CUDA graphs (bucketed step shapes) where the Triton path runs.
    cuda_graphs: bool = True
    # Ranks the model is split over (tensor_parallel.py); on GPUs one GPU each.
    tensor_parallel: int = 1
    # Sparse KV (kv_retention requests): KV slots, beside the page pool, where refresh steps keep
    # the prompt's keys and values while each head selects; a request whose prompt fits then
    # holds pages only for its generated positions and its sparse region. 0: prompts keep pages.
    sparse_scratch_tokens: int = 0
    # A quality profile (``dilaserve profile quality`` JSON) whose tokens decided per step seed
    # the engine's estimate for each threshold; None: the model directory's
    # ``quality_profile.json`` when there is one.
    quality_profile: str | None = None
