"""Sparse KV as one more planner setting: profiles with and without it, its capacity from the
cost model, and when the (real PuLP) planner chooses it."""

from __future__ import annotations

import json

import pytest

from dilaserve.planner import PlanStatus, ProfileError, ProfileSet, Workload, evaluate, load_profile_set, plan
from dilaserve.planner.capacity import capacity_table
from dilaserve.planner.profiles import latency_profile_from_dict, quality_profile_from_dict

# A device where reuse steps' attention reads weigh (per_context_s / per_token_s = 1/20): at long
# prompts a reuse step reading half the context is worth a few percent fewer tokens per step.
LATENCY = {"cache": "dual", "degrees": [
    {"degree": 1, "fixed_s": 5e-3, "per_token_s": 2e-5, "per_context_s": 1e-6, "max_running": 64,
     "kv_capacity_tokens": 10_000_000}]}
# Sparse at retention 0.5 loses 1 accuracy point and 5% of tokens decided per step.
QUALITY = {"block_size": 32, "entries": [
    {"threshold": 0.9, "accuracy": 0.80, "tokens_per_step": 2.0},
    {"threshold": 0.9, "kv_retention": 0.5, "accuracy": 0.79, "tokens_per_step": 1.9},
    {"threshold": 0.7, "accuracy": 0.76, "tokens_per_step": 4.0},
    {"threshold": 0.7, "kv_retention": 0.5, "accuracy": 0.75, "tokens_per_step": 3.8}]}
LONG, SHORT = (4000, 64), (64, 64)  # (prompt, output) tokens


def profiles(latency: dict = LATENCY, quality: dict = QUALITY) -> ProfileSet:
    return ProfileSet(latency_profile_from_dict(latency), quality_profile_from_dict(quality), "test")


def sparse_instances(result) -> list:
    return [i for i in result.plan.instances if i[2] is not None]


# -- profiles ------------------------------------------------------------------------------------
def test_a_profile_without_retention_reads_as_dense():
    old = {"block_size": 32, "entries": [{"threshold": 0.9, "accuracy": 0.8, "tokens_per_step": 2.0},
                                         {"threshold": 0.7, "kv_retention": None, "accuracy": 0.76, "tokens_per_step": 4.0}]}
    quality = quality_profile_from_dict(old)
    assert [e.setting for e in quality.settings()] == [(0.9, None), (0.7, None)] and not quality.has_sparse
    result = plan(profiles(quality=old), Workload(5.0, *LONG), 8, 3.0, 5.0)
    assert result.status is PlanStatus.OPTIMAL and not sparse_instances(result)


def test_dense_and_sparse_are_separate_settings_and_round_trip(tmp_path):
    quality = quality_profile_from_dict(QUALITY)
    assert [e.setting for e in quality.settings()] == [(0.9, None), (0.9, 0.5), (0.7, None), (0.7, 0.5)]
    assert quality.without_sparse().settings() == tuple(e for e in quality.settings() if e.kv_retention is None)
    (tmp_path / "quality.json").write_text(json.dumps(quality.to_dict()))
    (tmp_path / "latency.json").write_text(json.dumps(LATENCY))
    assert load_profile_set(tmp_path).quality == quality
    twice = {"block_size": 32, "entries": QUALITY["entries"] + [QUALITY["entries"][1]]}
    with pytest.raises(ProfileError, match=r"entries\[4\].*kv_retention 0.5 appears twice"):
        quality_profile_from_dict(twice)
    with pytest.raises(ProfileError, match="kv_retention"):
        quality_profile_from_dict({"block_size": 32, "entries": [dict(QUALITY["entries"][0], kv_retention=1.5)]})


def test_sparse_settings_need_the_dual_cache():
    table = capacity_table(profiles(latency={**LATENCY, "cache": "prefix"}), Workload(1.0, *LONG), 3.0)
    assert {g.kv_retention for g in table.groups} == {None}


def test_sparse_entries_do_not_move_the_deadline():
    dense_only = profiles().without_sparse()
    for lengths in (LONG, SHORT):
        assert (capacity_table(profiles(), Workload(1.0, *lengths), 3.0).deadline_s
                == capacity_table(dense_only, Workload(1.0, *lengths), 3.0).deadline_s)


# -- capacity ------------------------------------------------------------------------------------
def test_sparse_pays_only_at_long_context():
    """The cost model's verdict: sparse reads less per reuse step but decides fewer tokens per
    step, so its latency against dense's falls as the prompt grows (capacity follows, in whole
    batches): slower and fewer requests per second at short prompts, more at long ones."""
    speedups, gains = [], []
    for prompt in (64, 512, 2000, 4000, 8000):
        table = capacity_table(profiles(), Workload(1.0, prompt, 64), 3.0)
        sparse, dense = table.get(1, 0.9, 0.5), table.get(1, 0.9)
        speedups.append(dense.solo_latency_s / sparse.solo_latency_s)
        gains.append(sparse.capacity_rps / dense.capacity_rps)
    assert speedups == sorted(speedups) and speedups[0] < 1 < speedups[-1], speedups
    assert gains[0] < 1 < min(gains[1:]), gains


def test_sparse_requests_hold_their_sparse_region_in_the_kv_cache():
    tight = {**LATENCY, "degrees": [dict(LATENCY["degrees"][0], kv_capacity_tokens=3 * 4064)]}
    table = capacity_table(profiles(latency=tight), Workload(1.0, *LONG), 100.0)
    assert table.get(1, 0.9).max_batch == 3 and table.get(1, 0.9).limited_by == "kv_capacity"
    assert table.get(1, 0.9, 0.5).max_batch == 2  # 4064 + 2032 slots each


# -- the plan ------------------------------------------------------------------------------------
def test_long_prompts_and_room_in_the_budget_choose_sparse():
    result = plan(profiles(), Workload(9.0, *LONG), 8, 3.0, 2.0)
    assert result.status is PlanStatus.OPTIMAL
    assert sparse_instances(result) and all(r == 0.5 for _, _, r, _ in result.plan.instances if r is not None)
    dense = plan(profiles().without_sparse(), Workload(9.0, *LONG), 8, 3.0, 2.0)
    assert result.plan.gpus_used < dense.plan.gpus_used  # the point of choosing it
    assert result.plan.accuracy >= result.plan.min_accuracy - 1e-9
    assert any(g.kv_retention == 0.5 and g.traffic_share > 0 for g in result.plan.groups)


@pytest.mark.parametrize("rate", [5.0, 80.0, 160.0])
def test_short_prompts_stay_dense(rate):
    result = plan(profiles(), Workload(rate, *SHORT), 8, 3.0, 5.0)
    assert result.plan is not None and result.plan.instances and not sparse_instances(result)


def test_a_tight_quality_budget_stays_dense():
    result = plan(profiles(), Workload(9.0, *LONG), 8, 3.0, 0.0)
    assert result.status is PlanStatus.OPTIMAL and not sparse_instances(result)


def test_evaluate_takes_sparse_instances_and_old_three_field_rows():
    workload = Workload(9.0, *LONG)
    chosen = plan(profiles(), workload, 8, 3.0, 2.0).plan
    again = evaluate(chosen.instances, profiles(), workload, 3.0, 2.0)
    assert again.plan.served_share == pytest.approx(chosen.served_share)
    assert evaluate([(1, 0.9, 4)], profiles(), workload, 3.0, 2.0).plan.instances == ((1, 0.9, None, 4),)
    missing = evaluate([(1, 0.9, 0.25, 1)], profiles(), workload, 3.0, 2.0)
    assert missing.status is PlanStatus.INVALID and "kv_retention 0.25" in missing.message
