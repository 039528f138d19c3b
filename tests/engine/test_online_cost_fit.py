"""The engine's online estimates: the step-cost fit and tokens decided per step."""

import json
from pathlib import Path

import numpy as np
import pytest

from dilaserve.engine.cost_model import (
    BlockPace, OnlineCostModel, StepCost, TokensPerStepEstimator, Work, batch_finish_s, expected_tokens_per_step,
    with_block_steps,
)

EMBEDDED_PROFILE = Path(__file__).parents[2] / "dilaserve/assets/models/dilaserve-tiny-arith/quality_profile.json"


def feed(model: OnlineCostModel, rows) -> None:
    for tokens, ctx, seconds in rows:
        model.observe(tokens, ctx, seconds)


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    true = StepCost(fixed_s=3e-3, per_token_s=2e-5, per_context_s=4e-7)
    model = OnlineCostModel(prior=StepCost(1.0, 1.0, 1.0), refit_every=8)
    tokens, ctx = rng.integers(16, 2048, 64), rng.integers(64, 8192, 64)
    feed(model, [(t, c, true.step_s(t, c)) for t, c in zip(tokens, ctx)])
    got = model.cost
    assert got.fixed_s == pytest.approx(true.fixed_s, rel=1e-6)
    assert got.per_token_s == pytest.approx(true.per_token_s, rel=1e-6)
    assert got.per_context_s == pytest.approx(true.per_context_s, rel=1e-6)


def test_fit_never_goes_negative_and_is_the_best_nonnegative_fit():
    # Step time falls with context here (noise in a real window): plain least squares gives the
    # context term a negative rate; the fit must pin it at zero and refit the rest.
    rows = [(t, 5000 - 10 * t, 1e-3 + 1e-5 * t) for t in range(10, 330, 10)]
    model = OnlineCostModel(prior=StepCost(1.0, 1.0, 1.0), refit_every=8)
    feed(model, rows)
    c = model.cost
    assert min(c.fixed_s, c.per_token_s, c.per_context_s) >= 0
    err = sum((c.step_s(t, x) - s) ** 2 for t, x, s in rows)
    # No non-negative model on a grid around it does better.
    for dt in (0.9, 1.1):
        for df in (0.9, 1.1):
            other = StepCost(c.fixed_s * df, c.per_token_s * dt, c.per_context_s)
            assert err <= sum((other.step_s(t, x) - s) ** 2 for t, x, s in rows) + 1e-18


def test_terms_the_window_cannot_identify_keep_their_rate():
    # A fresh replica whose first steps all look alike: tokens and context never vary, so the
    # window cannot split step time between the fixed and the per-token terms.
    prior = StepCost(fixed_s=1e-3, per_token_s=2e-4, per_context_s=6e-6)
    model = OnlineCostModel(prior=prior, refit_every=8)
    feed(model, [(400, 400, 0.09 + 1e-4 * (i % 2)) for i in range(16)])
    assert model.cost.per_token_s == prior.per_token_s and model.cost.per_context_s == prior.per_context_s
    # The fixed term absorbs the difference, so the observed step is still predicted.
    assert model.cost.step_s(400, 400) == pytest.approx(0.09005, rel=1e-3)


def test_unseen_threshold_answers_from_measured_neighbours():
    est = TokensPerStepEstimator(min_samples=4)
    assert est.estimate(0.9, 32) == expected_tokens_per_step(0.9, 32, None)  # nothing known yet
    for _ in range(4):
        est.observe(0.9, 20)
        est.observe(0.5, 28)
    assert est.estimate(0.9, 32) == 20 and est.estimate(0.5, 32) == 28
    assert est.estimate(0.7, 32) == pytest.approx(24)  # between: interpolated
    assert est.estimate(0.95, 32) == 20  # stricter than anything run: the nearest known
    assert est.estimate(0.3, 32) == 28
    assert est.estimate(None, 32) == expected_tokens_per_step(None, 32, None)


def test_live_steps_outweigh_a_seed():
    est = TokensPerStepEstimator(min_samples=8)
    est.seed(0.9, 20.0)
    assert est.estimate(0.9, 32) == 20.0
    for _ in range(8 * 9):
        est.observe(0.9, 4)
    assert est.estimate(0.9, 32) == pytest.approx((20 * 8 + 4 * 72) / 80)


def test_seeding_from_the_embedded_models_profile_uses_whole_block_threshold_entries():
    profile = json.loads(EMBEDDED_PROFILE.read_text())
    est = TokensPerStepEstimator()
    n = est.seed_from_profile(profile["entries"], profile["block_size"])
    wanted = {round(e["threshold"], 3): e["tokens_per_step"] for e in profile["entries"]
              if e["threshold"] is not None and e["chunk"] == profile["block_size"] and not e["steps"]}
    assert n == len(wanted) >= 4
    for threshold, tps in wanted.items():
        assert est.estimate(threshold, 32) == pytest.approx(tps)


def test_a_replica_engine_starts_from_its_models_quality_profile(tmp_path):
    from dilaserve.engine.async_engine import AsyncEngine
    from dilaserve.engine.config import EngineConfig

    engine = AsyncEngine(str(EMBEDDED_PROFILE.parent), EngineConfig(num_pages=64)).engine
    assert engine.tokens_per_step_estimate.known()[0.9] == pytest.approx(22.535, rel=1e-3)
    with pytest.raises(ValueError, match="does not exist"):
        AsyncEngine(str(EMBEDDED_PROFILE.parent), EngineConfig(num_pages=64, quality_profile=str(tmp_path / "no.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('{"block_size": 32, "entries": [{"threshold": 0.9}]}')
    with pytest.raises(ValueError, match="malformed"):
        AsyncEngine(str(EMBEDDED_PROFILE.parent), EngineConfig(num_pages=64, quality_profile=str(bad)))


def test_step_overhead_counts_busy_gaps_not_idle_time(llada):
    """Wall time between steps beyond the runner's own is overhead only while work is queued:
    a replica idle for seconds between requests must not look seconds slower per step."""
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from dilaserve.engine.sampling_params import SamplingParams

    now = [0.0]
    engine = Engine(llada, EngineConfig(num_pages=64, page_size=8), clock=lambda: now[0])
    long = SamplingParams(max_tokens=8, block_size=8, steps=4, cache="dual")
    short = SamplingParams(max_tokens=8, block_size=8, steps=1, cache="dual")  # one step each
    for rid, params in [("long", long)] + [(f"s{i}", short) for i in range(8)]:
        engine.add(engine.make_request(rid, [1, 2, 3], params))
        while engine.has_work():
            engine.step()
            now[0] += 0.05  # 50 ms of wall time per step while busy
        now[0] += 30.0  # then idle: most gaps between steps are idle time here
    records = list(engine._recent_steps)
    assert len(records) == 12 and sum(r.overhead_s is not None for r in records) == 3
    assert 0.03 < engine.step_overhead_s() <= 0.05
    solo = engine.predict_latency_s(3, long)
    assert solo == pytest.approx(engine.predict_finish_s(3, long))  # idle: solo and finish agree
    assert solo >= 4 * engine.step_overhead_s()


def test_finish_predictions_learn_from_how_late_requests_really_finished(llada):
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.core import PREDICTION_WINDOW_S
    from dilaserve.engine.engine import Engine
    from dilaserve.engine.sampling_params import SamplingParams

    now = [0.0]
    engine = Engine(llada, EngineConfig(num_pages=64, page_size=8), clock=lambda: now[0])
    params = SamplingParams(max_tokens=8, block_size=8, steps=1, cache="dual")

    def serve(rid, deadline):
        engine.add(engine.make_request(rid, [1, 2, 3], params, deadline_s=deadline))
        # Each request takes 1 s of wall time in a step the cost model prices at milliseconds
        # (as when the host is busy with something else): predictions fall short.
        now[0] += 1.0
        engine.step()

    for i in range(32):  # before the step-cost fit has data, nothing is judged
        serve(f"warm{i}", now[0] + 5.0)
    assert engine.prediction_scale() == 1.0 and not engine._prediction_ratios
    for i in range(20):
        serve(f"r{i}", now[0] + 5.0)
        if i < 15:
            assert engine.prediction_scale() == 1.0  # too few finished requests to judge yet
    assert engine.prediction_scale() == 8.0  # capped
    scaled = engine.predict_finish_s(3, params)
    learned = list(engine._prediction_ratios)
    engine._prediction_ratios.clear()
    assert scaled == pytest.approx(8.0 * engine.predict_finish_s(3, params))
    engine._prediction_ratios.extend(learned)
    # It forgets: with nothing finishing (say admission refused everything at that scale), the
    # scale comes back down instead of starving the replica for good.
    now[0] += PREDICTION_WINDOW_S + 1
    assert engine.prediction_scale() == 1.0
    # Requests without deadlines are never judged.
    assert engine.make_request("x", [1], params).predictions == []


def test_prediction_scale_is_measured_per_load(llada):
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine

    now = [100.0]
    engine = Engine(llada, EngineConfig(num_pages=64, page_size=8), clock=lambda: now[0])
    # A nearly idle engine finished on time; a crowded one (8 others in flight) 3x late.
    engine._prediction_ratios.extend((99.0, 0.9 + 0.01 * (i % 10), i % 2) for i in range(20))
    engine._prediction_ratios.extend((99.0, 3.0, 8) for _ in range(20))
    assert engine.prediction_scale(load=0) == pytest.approx(0.99)
    assert engine.prediction_scale(load=1) == pytest.approx(0.99)  # loads 0..2 count
    assert engine.prediction_scale(load=8) == 3.0
    assert engine.prediction_scale(load=100) == 3.0  # nothing near: every sample, 95th percentile
    assert engine.prediction_scale() == pytest.approx(0.99)  # now: idle
    # Consistently pessimistic predictions scale down, to at most half.
    engine._prediction_ratios.clear()
    engine._prediction_ratios.extend((99.0, 0.2, 0) for _ in range(20))
    assert engine.prediction_scale(load=0) == 0.5


def test_a_newcomers_delay_is_charged_so_the_error_measures_the_model_alone(llada):
    """A request slowed down by a later arrival is not a prediction error: the engine charges
    the delay the cost model predicts for the newcomer to the requests already there."""
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from dilaserve.engine.sampling_params import SamplingParams

    now = [0.0]
    engine = Engine(llada, EngineConfig(num_pages=64, page_size=8), clock=lambda: now[0])
    params = SamplingParams(max_tokens=16, block_size=8, steps=4, cache="dual")
    for i in range(32):  # the step-cost fit needs data before predictions are judged
        engine.add(engine.make_request(f"warm{i}", [1, 2, 3], params))
        while engine.has_work():
            engine.step()
    first = engine.make_request("first", [1, 2, 3], params, deadline_s=100.0)
    engine.add(first)
    engine.step()
    assert len(first.predictions) == 1 and first.charged_s == 0.0
    cost, alone = engine.prediction_cost(), engine._work(first)
    newcomer = engine.make_request("newcomer", [4, 5, 6, 7], params, deadline_s=100.0)
    expected = batch_finish_s(cost, [alone, engine._work(newcomer)])[0] - batch_finish_s(cost, [alone])[0]
    engine.add(newcomer)
    engine.step()
    assert first.charged_s == pytest.approx(expected) and first.charged_s > 0
    (t0, predicted0, charged0, _), (t1, predicted1, charged1, load1) = first.predictions
    assert charged0 == 0.0 and charged1 == first.charged_s and load1 == 2
    assert len(newcomer.predictions) == 1 and newcomer.charged_s == 0.0
    now[0] = 10.0
    while engine.has_work():
        engine.step()
    ratios = sorted(r for _, r, _ in engine._prediction_ratios)
    # first: two predictions; each judged against itself plus the delays charged after it
    assert ratios == pytest.approx(sorted([(10.0 - t0) / (predicted0 + first.charged_s),
                                           (10.0 - t1) / predicted1, (10.0 - newcomer.predictions[0][0]) /
                                           newcomer.predictions[0][1]]))


def test_predictions_count_requests_added_but_not_yet_stepped(llada):
    """A step in progress leaves new requests in the engine's inbox; admission must still see
    them, or concurrent arrivals all find the same free room."""
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from dilaserve.engine.sampling_params import SamplingParams

    engine = Engine(llada, EngineConfig(num_pages=64, page_size=8))
    params = SamplingParams(max_tokens=16, block_size=8, steps=4, cache="dual")
    empty = engine.predict_finish_s(3, params)
    engine.add(engine.make_request("queued", [1, 2, 3], params, deadline_s=1e9))
    assert engine.num_waiting() == 1
    assert engine.predict_finish_s(3, params) > empty
    assert engine.predict_min_slack_s(3, params) < float("inf")


def test_block_pace_conditions_on_the_steps_a_block_has_taken():
    pace = BlockPace(min_samples=4)
    for _ in range(10):
        pace.observe(0.9, 32, 4)  # fast blocks
        pace.observe(0.9, 32, 30)  # slow ones
    assert pace.remaining(0.9, 32, 0) == pytest.approx(17.0)
    assert pace.remaining(0.9, 32, 3) == pytest.approx((1 + 27) / 2)
    assert pace.remaining(0.9, 32, 6) == pytest.approx(24.0)  # past the fast ones: a slow block
    assert pace.remaining(0.9, 32, 30) is None  # no block ran longer
    assert pace.remaining(0.8, 32, 0) is None and pace.remaining(0.9, 16, 0) is None  # other keys
    pace.observe(0.9, 32, 40)
    assert pace.remaining(0.9, 32, 6) == pytest.approx((24 * 10 + 34) / 11)  # the cache follows


def test_with_block_steps_prices_the_steps_it_adds_as_the_mean_step():
    work = Work(steps=10, tokens=1000, context_tokens=2000, pairs=300, queries=50)
    more = with_block_steps(work, counted=4, expected=9)
    assert more.steps == 15 and more.tokens == pytest.approx(1500) and more.context_tokens == pytest.approx(3000)
    assert more.pairs == pytest.approx(450) and more.queries == pytest.approx(75)
    fewer = with_block_steps(work, counted=6, expected=1)
    assert fewer.steps == 5 and fewer.tokens == pytest.approx(500)
    assert with_block_steps(work, counted=4, expected=4) is work
