"""The async interface: streaming in order, abort, disconnect, live policy changes."""

from __future__ import annotations

import asyncio

import pytest

from dilaserve.engine.async_engine import AsyncEngine
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.errors import InvalidRequestError
from dilaserve.generation.reference import GenerationConfig, generate


@pytest.fixture
def engine_factory(llada_dir):
    def make(**config):
        config.setdefault("num_pages", 256)
        return AsyncEngine(str(llada_dir), EngineConfig(page_size=8, **config))
    return make


def test_streams_grow_in_order_and_match_reference(engine_factory, llada):
    async def main():
        engine = engine_factory()
        await engine.start()
        params = SamplingParams(max_tokens=24, block_size=8, threshold=0.8, cache="dual")
        prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [42]]

        async def consume(i, prompt):
            pieces, last = [], None
            async for out in engine.add_request(f"r{i}", prompt, params):
                pieces.extend(out.new_token_ids)
                assert out.token_ids == pieces
                last = out
            return pieces, last

        results = await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))
        await engine.stop()
        return results

    results = asyncio.run(main())
    for (tokens, last), prompt in zip(results, [[1, 2, 3], [7, 8, 9, 10, 11], [42]]):
        ref = generate(llada, prompt, GenerationConfig(gen_length=24, block_length=8, threshold=0.8, cache="dual"))
        assert tokens == ref.token_ids and last.finished and last.finish_reason in ("eos", "length")
        assert last.counters.num_steps > 0 and last.counters.num_refresh_steps == 3


def test_abort_frees_pages_at_once(engine_factory):
    async def main():
        engine = engine_factory()
        await engine.start()
        stream = engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=512, block_size=8, threshold=1.0))
        first = await stream.__anext__()
        await engine.abort("a")
        rest = [out async for out in stream]
        stats = engine.stats()
        await engine.stop()
        return first, rest, stats

    first, rest, stats = asyncio.run(main())
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert stats.pages_free == stats.pages_total and stats.num_running == 0


def test_consumer_leaving_aborts_the_request(engine_factory):
    async def main():
        engine = engine_factory()
        await engine.start()
        stream = engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=512, block_size=8, threshold=1.0))
        await stream.__anext__()
        await stream.aclose()  # what a disconnecting HTTP client does
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.stats().num_running == 0:
                break
        stats = engine.stats()
        await engine.stop()
        return stats

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.pages_free == stats.pages_total


def test_bad_request_raises_at_add_and_engine_keeps_serving(engine_factory):
    async def main():
        engine = engine_factory()
        await engine.start()
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", [], SamplingParams())
        outs = [o async for o in engine.add_request("ok", [5], SamplingParams(max_tokens=8, block_size=8))]
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.add_request("dup", [5], SamplingParams(max_tokens=8))
            engine.add_request("dup", [5], SamplingParams(max_tokens=8))
        await engine.stop()
        return outs

    assert asyncio.run(main())[-1].finished


def test_live_threshold_change_applies_to_new_requests(engine_factory):
    async def main():
        engine = engine_factory()
        await engine.start()
        engine.set_policy(default_threshold=0.5)
        params = SamplingParams(max_tokens=16, block_size=8, threshold=None)
        request = engine.engine.make_request("x", [1, 2], params)
        with pytest.raises(InvalidRequestError):
            engine.set_policy(default_threshold=0.0)
        await engine.stop()
        return request.threshold, engine.stats().threshold_default

    assert asyncio.run(main()) == (0.5, 0.5)


def test_predictions_are_positive_and_grow_with_work(engine_factory):
    engine = engine_factory()
    short = engine.predict_latency_s(8, SamplingParams(max_tokens=16, block_size=8))
    long = engine.predict_latency_s(8, SamplingParams(max_tokens=128, block_size=8))
    assert 0 < short < long
    assert engine.predict_finish_s(8, SamplingParams(max_tokens=16, block_size=8)) >= short * 0.99
