"""The latency profile's fit, its held-out check, and what the engine derives from it."""

import json

import numpy as np
import pytest

from dilaserve.engine.cost_model import COST_TERMS, StepCost, StepShape, Work, batch_work_s, request_work, work_s
from dilaserve.engine.latency_profile import (
    LatencyPoint, ProfiledCost, engine_cost_model, error_summary, fit_step_cost, fit_with_holdout, holdout_split,
    load_step_cost, profile_dict, refresh_token_bound, save_profile,
)
from dilaserve.planner.profiles import load_latency_profile

TRUE = StepCost(fixed_s=4e-3, per_token_s=3e-5, per_context_s=1.5e-7, per_pair_s=2e-10, per_query_s=8e-6,
                per_request_s=5e-5)


def synthetic_points(cost: StepCost, noise: float = 0.0, seed: int = 0) -> list[LatencyPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for phase in ("refresh", "reuse", "mixed"):
        for batch in (1, 2, 4, 8, 16, 32):
            for chunk in (4, 8, 32):
                for context in (128, 512, 1024):
                    refreshing = {"refresh": batch, "reuse": 0}.get(phase, max(1, batch // 4))
                    tokens = refreshing * context + (batch - refreshing) * chunk
                    shape = StepShape(tokens, batch * context, tokens * context, batch * chunk, batch,
                                      refreshing * context)
                    seconds = cost.shape_s(shape) * (1 + noise * rng.standard_normal())
                    points.append(LatencyPoint(phase, batch, chunk, context, shape, seconds, (seconds,)))
    return points


def test_fit_recovers_known_coefficients_from_exact_data():
    fitted = fit_step_cost(synthetic_points(TRUE))
    for name in COST_TERMS:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_fit_with_noise_predicts_held_out_points_closely():
    cost, holdout = fit_with_holdout(synthetic_points(TRUE, noise=0.02, seed=3))
    assert holdout["num_test"] > 0 and holdout["num_train"] > holdout["num_test"]
    assert holdout["median_rel_error"] < 0.03
    assert cost.per_token_s == pytest.approx(TRUE.per_token_s, rel=0.1)


def test_three_term_fit_misses_what_the_full_form_captures():
    points = synthetic_points(TRUE)
    three = fit_step_cost(points, ("fixed_s", "per_token_s", "per_context_s"))
    assert three.per_pair_s == three.per_query_s == three.per_request_s == 0.0
    assert error_summary(three, points)["max_rel_error"] > 10 * error_summary(fit_step_cost(points), points)["max_rel_error"]


def test_held_out_error_on_hand_made_points():
    def point(tokens, seconds):
        return LatencyPoint("reuse", 1, 4, 16, StepShape(tokens, 16), seconds)

    cost = StepCost(fixed_s=1.0, per_token_s=0.0, per_context_s=0.0)
    # predictions are all 1 s: errors |1-1|/1 = 0, |1-2|/2 = 0.5, |1-0.5|/0.5 = 1
    summary = error_summary(cost, [point(1, 1.0), point(2, 2.0), point(3, 0.5)])
    assert summary == {"median_rel_error": 0.5, "max_rel_error": 1.0, "num": 3}


def test_holdout_split_is_seeded_and_disjoint():
    points = synthetic_points(TRUE)[:20]
    train, test = holdout_split(points, 0.25, seed=1)
    assert len(test) == 5 and len(train) == 15
    assert not {id(p) for p in train} & {id(p) for p in test}
    assert [id(p) for p in holdout_split(points, 0.25, seed=1)[1]] == [id(p) for p in test]


def test_step_cost_keeps_its_three_term_callers():
    old = StepCost(2e-3, 2e-5, 1e-7)
    assert old.step_s(100, 1000) == pytest.approx(2e-3 + 2e-5 * 100 + 1e-7 * 1000)
    work = request_work(300, 256, 32, 3.0, "dual")
    assert work_s(old, work) == pytest.approx(old.fixed_s * work.steps + old.per_token_s * work.tokens
                                             + old.per_context_s * work.context_tokens)
    assert Work(1, 2, 3).pairs == 0.0
    # the extra terms price the extra work
    assert work_s(TRUE, work) > work_s(StepCost(TRUE.fixed_s, TRUE.per_token_s, TRUE.per_context_s), work)
    assert batch_work_s(TRUE, [work, work]) > work_s(TRUE, work)


def test_profile_file_loads_as_step_cost_and_as_planner_profile(tmp_path):
    points = synthetic_points(TRUE)
    profile = profile_dict(points, {"model": "m", "device": "d", "cache": "dual"}, kv_capacity_tokens=1000)
    path = save_profile(profile, tmp_path / "latency.json")
    cost = StepCost.from_profile(path)
    assert cost.per_pair_s == pytest.approx(TRUE.per_pair_s, rel=1e-6)
    assert profile["holdout"]["max_rel_error"] < 1e-6
    planner = load_latency_profile(path)
    assert planner.degrees[0].degree == 1 and planner.degrees[0].kv_capacity_tokens == 1000
    # a planner-style file without a full fit gives its degree-1 three-term cost
    data = json.loads(path.read_text())
    del data["fit"]
    (tmp_path / "planner.json").write_text(json.dumps(data))
    assert load_step_cost(tmp_path / "planner.json").fixed_s == data["degrees"][0]["fixed_s"]
    model = engine_cost_model(str(path))
    assert isinstance(model, ProfiledCost) and model.cost == cost
    model.observe(10, 100, cost.step_s(10, 100) * 2)
    assert model.recent_rel_error() == pytest.approx(0.5)


def test_refresh_token_bound_by_hand():
    cost = StepCost(fixed_s=10e-3, per_token_s=1e-4, per_context_s=0.0)
    reuse = StepShape(tokens=100, context_tokens=0)  # 10 ms + 10 ms = 20 ms
    # refresh tokens may add 20 ms x 0.5 = 10 ms at 0.1 ms each: 100 tokens
    assert refresh_token_bound(cost, reuse, seq_len=512, slowdown=0.5) == 100
    with_pairs = StepCost(fixed_s=10e-3, per_token_s=1e-4, per_context_s=0.0, per_pair_s=1e-7)
    # each token of a 500-token sequence: 0.1 ms + 500 x 1e-7 s = 0.15 ms; budget 0.5 x (20 ms + 0) ...
    assert refresh_token_bound(with_pairs, reuse, seq_len=500, slowdown=0.5) == int(0.5 * 20e-3 / 1.5e-4)
