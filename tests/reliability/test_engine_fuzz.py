"""Engine input fuzzing: random valid and invalid sampling parameters and prompts, straight at
the engine (no HTTP). Every request is either refused at ``make_request`` with an
``InvalidRequestError`` (a ``ValueError`` is also accepted) that says what is wrong, or runs to
a proper finish; the step loop never raises, the engine drains, and every KV page comes back.

Examples per run: ``DILASERVE_FUZZ_EXAMPLES`` (default 150, each a batch of 1-4 requests), so
a longer hunt is ``DILASERVE_FUZZ_EXAMPLES=5000 pytest tests/reliability/test_engine_fuzz.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.errors import InvalidRequestError

torch.set_num_threads(1)
EXAMPLES = int(os.environ.get("DILASERVE_FUZZ_EXAMPLES", "150"))
MAX_STEPS = 2_000  # a batch of <= 4 requests of <= 40 tokens needs far fewer
NUM_PAGES = 64
PAGE_SIZE = 8


def _maybe(strategy):
    return st.none() | strategy


_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_probabilities = st.sampled_from([0.0, 1e-6, 0.5, 0.9, 1.0, 1.0001, -0.1]) | _floats
_small = st.integers(-2, 40)
_huge = st.sampled_from([10**9, 2**63, 2**64, -(2**63) - 1, 10**30])

params_strategy = st.builds(
    SamplingParams,
    max_tokens=st.integers(-1, 40) | _huge,
    block_size=st.integers(-1, 40) | _huge,
    threshold=_maybe(_probabilities),
    steps=_maybe(st.integers(-1, 80) | _huge),
    algorithm=st.sampled_from(["llada", "origin", "maskgit_plus", "topk_margin", "entropy", "bogus", ""]),
    remasking=st.sampled_from(["low_confidence", "random", "high", ""]),
    temperature=st.sampled_from([0.0, 0.7, 2.0, -1.0]) | _floats,
    top_p=_maybe(_probabilities),
    top_k=_maybe(_small | _huge),
    chunk_size=_maybe(_small),
    min_chunk=_small,
    max_chunk=_maybe(_small),
    cache=st.sampled_from(["none", "prefix", "dual", "exact", "bogus"]),
    refresh_interval=st.integers(-1, 4),
    stop=st.lists(st.text(max_size=3), max_size=2).map(tuple),
    stop_token_ids=st.lists(st.integers(-5, 400) | _huge, max_size=3).map(tuple),
    seed=_maybe(st.integers(-5, 5) | _huge),
    threshold_floor=_maybe(_probabilities),
)
# Mostly sensible settings, so that a good share of requests is accepted and decoded.
sane_params_strategy = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 40),
    block_size=st.sampled_from([1, 2, 4, 8, 16, 32]),
    threshold=_maybe(st.floats(0.05, 1.0)),
    steps=st.none() | st.sampled_from([1, 2, 4, 8, 16, 32]),
    algorithm=st.sampled_from(["llada"] * 6 + ["origin", "maskgit_plus", "topk_margin", "entropy"]),
    remasking=st.sampled_from(["low_confidence", "random"]),
    temperature=st.sampled_from([0.0, 0.0, 0.5, 1.0]),
    top_p=_maybe(st.floats(0.1, 1.0)),
    top_k=_maybe(st.integers(1, 400)),
    chunk_size=_maybe(st.integers(1, 8)),
    max_chunk=_maybe(st.integers(1, 32)),
    cache=st.sampled_from(["none", "prefix", "dual"]),
    refresh_interval=st.integers(0, 3),
    stop=st.lists(st.text(min_size=1, max_size=2), max_size=2).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 319), max_size=2).map(tuple),
    seed=_maybe(st.integers(0, 2**63)),
    threshold_floor=_maybe(st.floats(0.05, 1.0)),
)
prompt_strategy = st.one_of(
    st.lists(st.integers(0, 319), min_size=1, max_size=24),  # in the vocabulary
    st.lists(st.integers(-3, 330), max_size=8),  # some out of it, maybe empty
    st.lists(st.integers(0, 255), min_size=1000, max_size=1030),  # at the model's 1024 positions
    st.lists(st.booleans() | st.just(3.0) | st.just("7"), min_size=1, max_size=3),  # not ints
)


@pytest.fixture(scope="module")
def engine(llada):
    return Engine(llada, EngineConfig(num_pages=NUM_PAGES, page_size=PAGE_SIZE, max_batch_tokens=2048))


def _is_clear(exc: Exception) -> bool:
    return isinstance(exc, (InvalidRequestError, ValueError)) and len(str(exc)) >= 10


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=st.lists(st.tuples(st.lists(st.integers(0, 319), min_size=1, max_size=24), sane_params_strategy)
                      | st.tuples(prompt_strategy, params_strategy), min_size=1, max_size=4))
def test_engine_refuses_bad_input_clearly_and_finishes_the_rest(engine, batch):
    accepted: dict[str, SamplingParams] = {}
    for i, (prompt, params) in enumerate(batch):
        rid = f"r{i}"
        try:
            request = engine.make_request(rid, prompt, params)
        except Exception as exc:  # noqa: BLE001 - the point is which exceptions come out
            assert _is_clear(exc), f"unclear refusal of {params} / prompt {prompt[:5]}: {exc!r}"
            event("refused")
            continue
        event("accepted")
        engine.add(request)
        accepted[rid] = params
    tokens: dict[str, list[int]] = {rid: [] for rid in accepted}
    finished: dict[str, str] = {}
    for _ in range(MAX_STEPS):
        if not engine.has_work():
            break
        for out in engine.step():  # must never raise
            tokens[out.request_id].extend(out.new_token_ids)
            assert out.token_ids == tokens[out.request_id]
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert not engine.has_work(), f"the engine did not drain in {MAX_STEPS} steps: {accepted}"
    assert set(finished) == set(accepted)
    for rid, params in accepted.items():
        assert finished[rid] in ("eos", "stop", "length"), (finished[rid], params)
        assert len(tokens[rid]) <= params.max_tokens
        assert all(0 <= t < engine.spec.vocab_size for t in tokens[rid])
        if finished[rid] == "length":
            assert len(tokens[rid]) == params.max_tokens
    assert engine.allocator.num_free == NUM_PAGES
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_a_huge_step_count_is_refused_not_run():
    """LLaDA's schedule with more steps than positions decides nothing in some steps; a huge
    count used to build a schedule list of that length inside the step loop."""
    with pytest.raises(InvalidRequestError, match="steps"):
        SamplingParams(max_tokens=16, block_size=16, steps=10**9).validate()
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=2**64).validate()
    SamplingParams(max_tokens=16, block_size=16, steps=16, seed=2**64 - 1).validate()
    assert math.isfinite(SamplingParams(max_tokens=16, block_size=8, steps=4).num_blocks)
