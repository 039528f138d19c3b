"""Cache modes as one rule: which positions a step computes.

- ``none``: every step refreshes (computes the whole sequence).
- ``prefix`` (Fast-dLLM): refresh at the block start; then compute block + suffix.
- ``dual`` (Fast-dLLM): refresh at the block start; then compute the block up to the last
  query or the last position committed since the refresh, whichever is later. With a chunk of
  the whole block this is the whole block, as Fast-dLLM computes it; with smaller chunks it
  skips the block's still-masked tail, whose cached keys and values are still exact.
- ``refresh_interval`` N (any cached mode): also refresh on every N-th step of a block.
- ``exact`` (block-causal models only): never refresh. A step computes from the first position
  whose cached keys and values are not final (``request.cached_until``) to the end of the
  current block. On a block's first step that range starts at the previous block, whose keys
  and values are recomputed with its committed tokens (on a request's first step: at 0, the
  prompt prefill); later steps compute only the block. This is the reference generator's rule
  (see ``generation/reference.py``).

Models with shifted logits (Dream) read position p from the hidden state at p - 1, so a reuse
window starts one position early.
"""

from __future__ import annotations

from dilaserve.engine.request import Request


def needs_refresh(request: Request) -> bool:
    params = request.params
    if params.cache == "exact":
        return False
    if params.cache == "none" or not request.has_cache or request.step_in_block == 0:
        return True
    interval = params.refresh_interval
    return bool(interval) and request.step_in_block % interval == 0


def compute_range(request: Request, query_positions: list[int], is_refresh: bool, shift: bool) -> tuple[int, int]:
    if request.params.cache == "exact":
        return request.cached_until, request.block_end
    if is_refresh:
        return 0, request.seq_len
    start = request.block_start - 1 if shift else request.block_start
    if request.params.cache == "prefix":
        return start, request.seq_len
    end = max(query_positions[-1] + 1, request.dirty_until + 1)
    return start, end
