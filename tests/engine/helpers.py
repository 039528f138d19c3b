"""Small builders for engine tests."""

from __future__ import annotations

import torch

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.sampling_params import SamplingParams


def make_prompts(n: int, seed: int = 0, lo: int = 2, hi: int = 24) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def run_to_completion(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]], max_steps: int = 10_000):
    """Adds every request, steps until idle; returns {id: (token_ids, finish_reason, counters)}."""
    for rid, prompt, params in requests:
        engine.add(engine.make_request(rid, prompt, params))
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
    done = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.token_ids == tokens[out.request_id]  # streamed pieces add up, in order
            if out.finished:
                done[out.request_id] = (tokens[out.request_id], out.finish_reason, out.counters)
    assert not engine.has_work(), "engine did not drain"
    return done


def new_engine(model, **config) -> Engine:
    config.setdefault("num_pages", 512)
    config.setdefault("page_size", 8)
    return Engine(model, EngineConfig(**config))
