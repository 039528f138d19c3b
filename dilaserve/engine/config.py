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
    chunk_control: str = "fixed"  # how chunk sizes are chosen (see chunk_control.py)
    default_threshold: float = 0.9
    threshold_step: float = 0.1  # load control lowers a late request's threshold by this
    load_control: bool = False  # lower thresholds of late requests down to their floor
    # "auto": Triton kernels (paged attention, fused logit budget) on CUDA when triton imports;
    # "torch": the pure-torch reference path everywhere; "triton": require the kernels.
    kernels: str = "auto"
