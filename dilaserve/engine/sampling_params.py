"""Per-request decoding settings, validated once when a request is added."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from dilaserve.errors import InvalidRequestError
from dilaserve.generation.names import DREAM_ALGORITHMS, REMASKING

if TYPE_CHECKING:
    from dilaserve.generation.unmasking import Unmasker

# "exact" is for block-causal models only (checked against the model when a request is added).
CACHE_MODES = ("none", "prefix", "dual", "exact")


def default_cache(causal_block_size: int) -> str:
    """The cache mode a model decodes with unless told otherwise: a block-causal model (SDAR,
    ``causal_block_size`` > 0) keeps its finished blocks exactly; a bidirectional one the dual cache."""
    return "exact" if causal_block_size else "dual"


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. Lengths are in tokens; ``threshold`` is a probability.

    ``steps`` set: LLaDA's fixed-steps schedule (forwards over all blocks). Otherwise
    confidence-threshold unmasking at ``threshold``, or at the engine's default threshold
    (which operators can change live) when ``threshold`` is None.
    """

    max_tokens: int = 128  # generated positions; the last block may be shorter than block_size
    block_size: int = 32
    threshold: float | None = None
    steps: int | None = None
    algorithm: str = "llada"  # or a Dream algorithm (origin, maskgit_plus, topk_margin, entropy)
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    # Chunked decoding (Optimus): a step queries the first c still-masked positions of the block.
    # chunk_size fixes c; otherwise the engine's chunk controller picks c in [min_chunk, max_chunk].
    chunk_size: int | None = None
    min_chunk: int = 1
    max_chunk: int | None = None  # default: block_size
    cache: str = "dual"
    refresh_interval: int = 0  # refresh on every N-th step of a block (0: only at block start)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-sequence id
    seed: int | None = None
    # Load control: the engine may lower this request's threshold down to this floor when it
    # runs late (None: never lower it).
    threshold_floor: float | None = None
    # Head-centric sparse KV (dLLM-Serve; dual cache, bidirectional models): at each refresh
    # every KV head keeps this share of the positions outside the current block, those the
    # block's queries attend to most (scores averaged over ``kv_smoothing`` neighbouring
    # positions); reuse steps read only them and the block. None: dense.
    kv_retention: float | None = None
    kv_smoothing: int = 5

    @property
    def is_sparse_kv(self) -> bool:
        return self.kv_retention is not None

    @property
    def num_blocks(self) -> int:
        return -(-self.max_tokens // self.block_size)

    @property
    def decodes_whole_blocks(self) -> bool:
        """Fixed-steps and Dream schedules count over the whole block: no chunking."""
        return self.steps is not None or self.algorithm in DREAM_ALGORITHMS

    @property
    def chunk_bounds(self) -> tuple[int, int]:
        if self.decodes_whole_blocks:
            return self.block_size, self.block_size
        if self.chunk_size is not None:
            return self.chunk_size, self.chunk_size
        return self.min_chunk, self.max_chunk or self.block_size

    def validate(self) -> None:
        """Raises InvalidRequestError naming the first bad field."""
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.block_size < 1:
            raise InvalidRequestError(f"block_size must be >= 1, got {self.block_size}")
        if self.cache not in CACHE_MODES:
            raise InvalidRequestError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.refresh_interval < 0:
            raise InvalidRequestError(f"refresh_interval must be >= 0, got {self.refresh_interval}")
        if self.algorithm not in ("llada", *DREAM_ALGORITHMS):
            raise InvalidRequestError(
                f"unknown unmasking algorithm {self.algorithm!r}; known: llada, {', '.join(DREAM_ALGORITHMS)}"
            )
        if self.algorithm in DREAM_ALGORITHMS and self.steps is None:
            raise InvalidRequestError(f"Dream algorithm {self.algorithm!r} runs on a timestep schedule: set steps")
        if self.remasking not in REMASKING:
            raise InvalidRequestError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.steps is not None:
            if self.steps < 1:
                raise InvalidRequestError(f"steps must be >= 1, got {self.steps}")
            if self.steps % self.num_blocks:
                raise InvalidRequestError(f"steps {self.steps} is not divisible by the number of blocks {self.num_blocks}")
            if self.steps // self.num_blocks > self.block_size:
                # More steps than positions would decide nothing in some steps (and a huge count
                # would tie a replica up): at most one step per position.
                raise InvalidRequestError(
                    f"steps {self.steps} exceeds the generated positions ({self.num_blocks} block(s) of "
                    f"{self.block_size}): at most {self.num_blocks * self.block_size}"
                )
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise InvalidRequestError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.threshold_floor is not None and not (0.0 < self.threshold_floor <= 1.0):
            raise InvalidRequestError(f"threshold_floor must be in (0, 1], got {self.threshold_floor}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1, got {self.top_k}")
        asked = (self.chunk_size, self.chunk_size) if self.chunk_size is not None else (
            self.min_chunk, self.max_chunk or self.block_size)
        if not (1 <= asked[0] <= asked[1] <= self.block_size):
            raise InvalidRequestError(
                f"chunk size bounds [{asked[0]}, {asked[1]}] must lie within 1..block_size ({self.block_size})"
            )
        if self.decodes_whole_blocks and (self.chunk_size or self.max_chunk or self.block_size) != self.block_size:
            raise InvalidRequestError("fixed-steps and Dream schedules decode whole blocks: chunk size must equal block_size")
        if self.kv_retention is not None:
            if not (0.0 < self.kv_retention <= 1.0):
                raise InvalidRequestError(f"kv_retention must be in (0, 1], got {self.kv_retention}")
            if self.cache != "dual":
                raise InvalidRequestError(f"kv_retention needs cache 'dual', got {self.cache!r}")
            if self.refresh_interval:
                raise InvalidRequestError("kv_retention selects at block-start refreshes: refresh_interval must be 0")
        if self.kv_smoothing < 1 or self.kv_smoothing % 2 == 0:
            raise InvalidRequestError(f"kv_smoothing must be an odd number >= 1, got {self.kv_smoothing}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must fit in 64 bits, got {self.seed}")

    def unmasker(self, threshold: float | None) -> "Unmasker":
        """The strategy for this request at ``threshold`` (which load control may lower)."""
        from dilaserve.generation.unmasking import make_unmasker

        steps_per_block = None if self.steps is None else self.steps // self.num_blocks
        return make_unmasker(
            algorithm=self.algorithm, threshold=None if self.steps is not None else threshold,
            steps_per_block=steps_per_block, temperature=self.temperature, remasking=self.remasking,
            top_p=self.top_p, top_k=self.top_k,
        )


@dataclass
class RequestCounters:
    """What one request cost; summed per engine they feed the cost model."""

    num_steps: int = 0  # forwards the request took part in
    num_refresh_steps: int = 0
    num_tokens_computed: int = 0  # token-forwards spent on it
    num_tokens_decided: int = 0  # positions committed
    num_queries: int = 0  # masked positions queried, summed over steps (their mean is the chunk size)
    num_threshold_lowerings: int = 0

    @property
    def mean_chunk_size(self) -> float | None:
        return self.num_queries / self.num_steps if self.num_steps else None


@dataclass
class RequestOutput:
    """One update of a request's stream. ``new_token_ids`` continue the text in order."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]  # everything emitted so far
    finished: bool = False
    finish_reason: str | None = None  # "eos", "length", "stop", "abort", "error"
    num_prompt_tokens: int = 0
    counters: RequestCounters = field(default_factory=RequestCounters)
    error: str | None = None
    threshold: float | None = None  # the threshold in use now (load control may have lowered it)
