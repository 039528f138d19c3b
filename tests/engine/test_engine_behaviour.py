"""Memory pressure, end of sequence, chunking, phase mixing and bad input."""

from __future__ import annotations

import pytest

from dilaserve.engine.kv_pages import PageAllocator
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.errors import InvalidRequestError
from dilaserve.generation.reference import GenerationConfig, generate
from tests.engine.helpers import make_prompts, new_engine, run_to_completion


def test_page_allocator_round_trip():
    alloc = PageAllocator(num_pages=10, page_size=4)
    a = alloc.allocate(9)  # 3 pages
    b = alloc.allocate(28)  # 7 pages
    assert alloc.num_free == 0 and not alloc.can_allocate(1)
    with pytest.raises(MemoryError):
        alloc.allocate(1)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free == 10 and len(set(a) | set(b)) == 10
    with pytest.raises(RuntimeError, match="twice"):
        alloc.free(a)


def test_small_page_pool_queues_and_finishes_everything(llada):
    """The pool holds ~2 requests at once; 12 requests all finish, correct, pages returned."""
    prompts = make_prompts(12, seed=8, lo=4, hi=12)
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.8, cache="dual")
    engine = new_engine(llada, num_pages=8, page_size=8)  # 64 token slots; a request needs <= 28
    max_running = 0
    for i, p in enumerate(prompts):
        engine.add(engine.make_request(f"r{i}", p, params))
    outputs: dict[str, list[int]] = {}
    finished = set()
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        max_running = max(max_running, len(engine.scheduler.running))
    assert finished == {f"r{i}" for i in range(12)}
    assert max_running <= 2 and engine.allocator.num_free == 8
    for i, p in enumerate(prompts):
        ref = generate(llada, p, GenerationConfig(gen_length=16, block_length=8, threshold=0.8, cache="dual"))
        assert outputs[f"r{i}"] == ref.token_ids


def test_finishes_at_end_of_sequence_without_computing_the_rest(llada):
    params = SamplingParams(max_tokens=64, block_size=8, threshold=0.9, cache="dual", stop_token_ids=tuple(range(320)))
    engine = new_engine(llada)
    done = run_to_completion(engine, [("a", [5, 6, 7], params)])
    tokens, reason, counters = done["a"]
    # Every token is a stop token here, so the first committed prefix position ends it.
    assert tokens == [] and reason == "eos"
    assert counters.num_tokens_decided < 64 and counters.num_steps <= 8
    assert engine.allocator.num_free == engine.allocator.num_pages


def test_length_finish_reason(llada):
    params = SamplingParams(max_tokens=10, block_size=4, threshold=0.5, cache="prefix")  # last block partial
    done = run_to_completion(new_engine(llada), [("a", [1, 2, 3], params)])
    tokens, reason, counters = done["a"]
    if llada.spec.eos_token_id not in tokens:
        assert reason == "length" and len(tokens) == 10
    assert counters.num_tokens_decided <= 10


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_decoding_decides_only_its_chunk(llada, chunk):
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.5, cache="dual", chunk_size=chunk)
    engine = new_engine(llada)
    engine.add(engine.make_request("a", [4, 5, 6, 7], params))
    engine._drain_inbox()
    while engine.has_work():
        plan = engine.scheduler.schedule()
        for item in plan.items:
            assert len(item.query_positions) <= chunk
            if not item.is_refresh:  # a dual reuse window ends at the chunk or the last commit
                assert item.compute_start == item.request.block_start
                assert item.compute_end <= item.request.block_end
        out = engine.runner.run(plan)
        for d in out.decisions.values():
            assert 1 <= len(d.positions) <= chunk
        engine.scheduler.update(plan, out)


def test_chunk_one_decodes_left_to_right_one_token_per_step(llada):
    """c = 1 is the autoregressive-equivalent cost: one position per step, in order."""
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.01, cache="dual", chunk_size=1)
    engine = new_engine(llada)
    engine.add(engine.make_request("a", [9, 9, 9], params))
    engine._drain_inbox()
    committed = []
    while engine.has_work():
        plan = engine.scheduler.schedule()
        out = engine.runner.run(plan)
        committed.extend(out.decisions["a"].positions)
        engine.scheduler.update(plan, out)
    assert committed == list(range(3, 3 + len(committed)))


def test_refresh_tokens_per_step_are_bounded(llada):
    """Phase mixing: refreshes of many new requests spread over steps."""
    engine = new_engine(llada, max_refresh_tokens=40)
    prompts = make_prompts(6, seed=1, lo=10, hi=11)  # each refresh: 10 + 16 = 26 tokens
    params = SamplingParams(max_tokens=16, block_size=8, threshold=0.9, cache="dual")
    for i, p in enumerate(prompts):
        engine.add(engine.make_request(f"r{i}", p, params))
    engine._drain_inbox()
    seen_refresh = 0
    while engine.has_work():
        plan = engine.scheduler.schedule()
        assert plan.num_refresh_tokens <= 40 or sum(i.is_refresh for i in plan.items) == 1
        seen_refresh += sum(i.is_refresh for i in plan.items)
        engine.scheduler.update(plan, engine.runner.run(plan))
    assert seen_refresh >= 6 * 2  # every request refreshed at each of its two blocks


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1] * 1000, SamplingParams(max_tokens=128), "exceeds the model's maximum"),
        ([1], SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        ([1], SamplingParams(max_tokens=-5), "max_tokens must be >= 1"),
        ([1], SamplingParams(chunk_size=0), "chunk size bounds"),
        ([1], SamplingParams(chunk_size=33, block_size=32), "chunk size bounds"),
        ([1], SamplingParams(cache="paged"), "cache must be one of"),
        ([1], SamplingParams(algorithm="beam"), "unknown unmasking algorithm"),
        ([1], SamplingParams(remasking="lowest"), "remasking must be one of"),
        ([1], SamplingParams(threshold=1.5), "threshold must be in"),
        ([1], SamplingParams(threshold=0.0), "threshold must be in"),
        ([1], SamplingParams(threshold_floor=2.0), "threshold_floor"),
        ([1], SamplingParams(max_tokens=64, steps=3), "not divisible by the number of blocks"),
        ([1, 99999], SamplingParams(), "outside the vocabulary"),
        ([1], SamplingParams(temperature=-1), "temperature"),
    ],
)
def test_bad_input_is_refused_and_engine_keeps_serving(llada, prompt, params, message):
    engine = new_engine(llada)
    good = SamplingParams(max_tokens=8, block_size=8, threshold=0.9)
    engine.add(engine.make_request("good", [3, 4], good))
    with pytest.raises(InvalidRequestError, match=message):
        engine.make_request("bad", prompt, params)
    done = run_to_completion(engine, [])
    assert "good" in done


def test_request_larger_than_the_whole_pool_is_refused(llada):
    engine = new_engine(llada, num_pages=2, page_size=8)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        engine.make_request("big", [1] * 10, SamplingParams(max_tokens=32))


def test_counters_report_the_mean_chunk(llada):
    # chunk 3 of a 6-wide block: the queries go 3, 3 (or fewer once the block runs short).
    params = SamplingParams(max_tokens=12, block_size=6, threshold=0.99, cache="dual", chunk_size=3)
    tokens, reason, counters = run_to_completion(new_engine(llada), [("a", [1, 2, 3], params)])["a"]
    assert counters.num_queries <= 3 * counters.num_steps
    assert counters.num_queries >= counters.num_tokens_decided
    assert 1 <= counters.mean_chunk_size <= 3
