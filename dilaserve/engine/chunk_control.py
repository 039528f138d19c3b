"""Chunk-size control: how many still-masked positions of its block a request queries per step.

A strategy sees the requests about to be scheduled and returns a chunk per request, within
each request's own bounds (``SamplingParams.chunk_bounds``).
"""

from __future__ import annotations

from typing import Protocol

from dilaserve.engine.request import Request


class ChunkController(Protocol):
    def choose(self, requests: list[Request]) -> dict[str, int]: ...

    def observe(self, request: Request, chunk: int, num_decided: int) -> None: ...


class FixedChunk:
    """Each request's largest allowed chunk (the whole block unless it asked for less)."""

    def choose(self, requests: list[Request]) -> dict[str, int]:
        return {r.request_id: r.params.chunk_bounds[1] for r in requests}

    def observe(self, request: Request, chunk: int, num_decided: int) -> None:
        pass


def make_chunk_controller(name: str) -> ChunkController:
    if name == "fixed":
        return FixedChunk()
    raise ValueError(f"unknown chunk control {name!r}; known: fixed")
