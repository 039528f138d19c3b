"""Block layout of block-causal models (torch-free: the engine core and the reference share it)."""

from __future__ import annotations

from dilaserve.errors import InvalidRequestError

BLOCK_CAUSAL_CACHE_MODES = ("none", "exact")


def check_block_causal_settings(causal_block_size: int, block_size: int, cache: str, refresh_interval: int) -> None:
    """What a block-causal model allows: its own block size, cache 'exact' or 'none', no refresh."""
    if block_size != causal_block_size:
        raise InvalidRequestError(
            f"this model is block-causal with block size {causal_block_size}: the decoding block size must "
            f"equal it, got {block_size}"
        )
    if cache not in BLOCK_CAUSAL_CACHE_MODES:
        raise InvalidRequestError(
            f"this model is block-causal (its cache of finished blocks is exact): cache must be one of "
            f"{BLOCK_CAUSAL_CACHE_MODES}, got {cache!r}"
        )
    if cache == "exact" and refresh_interval:
        raise InvalidRequestError("refresh_interval has no meaning with cache 'exact' (nothing is ever refreshed)")


def block_origin(prompt_len: int, causal_block_size: int) -> int:
    """Where the first decoded block starts: right after the prompt for bidirectional models,
    at the prompt's last block boundary for block-causal ones (blocks align to position 0)."""
    return prompt_len if not causal_block_size else prompt_len // causal_block_size * causal_block_size
