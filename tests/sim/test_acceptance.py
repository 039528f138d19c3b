"""The acceptance model: calibrated draws make the engine observe the profile's tokens per step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dilaserve.engine.cost_model import expected_tokens_per_step
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.sim import AcceptanceModel, ReplicaGroup
from dilaserve.sim.acceptance import calibrated_lam, expected_steps
from dilaserve.sim.step_replica import MASK_ID, StepReplica


def test_expected_steps_by_hand():
    assert expected_steps(1.0, 7) == pytest.approx(7.0)  # always one position per step
    # lam = 2: K = 1 + Poisson(1); two positions take 1 step with P(K >= 2) = 1 - e^-1, else 2.
    assert expected_steps(2.0, 2) == pytest.approx(1 + np.exp(-1.0))


@pytest.mark.parametrize("observed", [1.0, 1.7, 3.0, 6.0, 31.0])
def test_calibration_hits_the_observed_rate_on_full_blocks(observed):
    assert 32 / expected_steps(calibrated_lam(observed, 32), 32) == pytest.approx(observed, rel=1e-6)


def test_the_engine_estimator_learns_the_profile_mean():
    model = AcceptanceModel(((0.5, 6.0), (0.9, 3.0)))
    replica = StepReplica("r", ReplicaGroup("g"), model, seed=0)
    for i in range(300):
        params = SamplingParams(max_tokens=64, block_size=32, threshold=0.7)
        replica.scheduler.add(Request(str(i), [0] * 10, params, MASK_ID, frozenset(), 0.0, threshold=0.7))
    now = 0.0
    while replica.scheduler.has_work():
        now = replica.start_step(now)
        replica.finish_step(now)
    assert replica.tokens_per_step_estimate.estimate(0.7, 32) == pytest.approx(4.5, rel=0.03)


def test_mean_from_profile_or_prior(tmp_path):
    assert AcceptanceModel().mean(0.9, 32) == expected_tokens_per_step(0.9, 32, None)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"entries": [
        {"threshold": 0.9, "tokens_per_step": 2.0}, {"threshold": 0.5, "tokens_per_step": 4.0},
        {"threshold": None, "steps": 64, "tokens_per_step": 1.0},
    ]}))
    model = AcceptanceModel.from_quality_profile(path)
    assert model.mean(0.7, 32) == pytest.approx(3.0)
    assert model.mean(0.99, 32) == 2.0 and model.mean(0.1, 32) == 4.0  # clamped at the ends
    assert model.mean(0.1, 2) == 2.0  # never more than the block


def test_draws_stay_within_bounds():
    rng = np.random.default_rng(0)
    draws = [AcceptanceModel.draw(rng, 5.0, 3) for _ in range(1000)]
    assert min(draws) >= 1 and max(draws) == 3


def test_profile_with_several_chunk_sizes_reads_full_blocks_unless_told(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"block_size": 32, "entries": [
        {"threshold": 0.9, "chunk": 32, "block_size": 32, "tokens_per_step": 22.5},
        {"threshold": 0.9, "chunk": 8, "block_size": 32, "tokens_per_step": 7.5},  # listed last: must not win
    ]}))
    assert AcceptanceModel.from_quality_profile(path).mean(0.9, 32) == pytest.approx(22.5)
    assert AcceptanceModel.from_quality_profile(path, chunk=8).mean(0.9, 32) == pytest.approx(7.5)
