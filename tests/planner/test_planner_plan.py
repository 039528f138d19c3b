"""``plan`` and ``evaluate``: statuses, messages, and the constraints every plan keeps."""

from __future__ import annotations

import math
import re

import pytest

from dilaserve.planner import PlannerOptions, PlanStatus, Workload, evaluate, load_profile_set, plan
from dilaserve.planner.capacity import capacity_table
from tests.planner.helpers import make_profiles


def _check_constraints(result, profiles, workload, gpus, slo_scale, budget):
    p = result.plan
    assert p.gpus_used == sum(g.gpus for g in p.groups) <= gpus
    assert sum(g.traffic_share for g in p.groups) == pytest.approx(p.served_share, abs=1e-6)
    for g in p.groups:
        assert g.traffic_share * workload.rate_rps <= g.count * g.capacity_rps + 1e-6
    assert p.accuracy >= p.best_accuracy - budget / 100 - 1e-9


@pytest.mark.parametrize("gpus,rate", [(1, 0.5), (4, 5.0), (16, 30.0), (64, 100.0), (8, 500.0)])
@pytest.mark.parametrize("budget", [0.0, 1.0, 5.0])
def test_plans_keep_every_constraint(gpus, rate, budget):
    profiles = load_profile_set()
    workload = Workload(rate, 256, 256)
    result = plan(profiles, workload, gpus, 3.0, budget)
    assert result.status in (PlanStatus.OPTIMAL, PlanStatus.OVERLOADED), result.message
    _check_constraints(result, profiles, workload, gpus, 3.0, budget)
    assert (result.status is PlanStatus.OPTIMAL) == (result.plan.served_share >= 1 - 1e-6)


def test_accuracy_constraint_binds_with_no_budget():
    profiles = load_profile_set()
    workload = Workload(80.0, 256, 256)  # more than 16 GPUs serve at any threshold
    strict = plan(profiles, workload, 16, 3.0, 0.0).plan
    assert {g.threshold for g in strict.groups} == {0.95}  # only the most accurate threshold
    assert strict.accuracy == pytest.approx(strict.best_accuracy)
    loose = plan(profiles, workload, 16, 3.0, 3.0).plan
    assert loose.served_share > strict.served_share  # the budget is spent on speed...
    assert min(g.accuracy for g in loose.groups) < loose.min_accuracy  # ...down to settings below the floor,
    assert loose.min_accuracy <= loose.accuracy < loose.min_accuracy + 1e-3  # mixed to just above it
    free = plan(profiles, workload, 16, 3.0, 100.0).plan
    assert free.served_share > loose.served_share and free.accuracy < loose.min_accuracy


def test_fewest_gpus_when_everything_fits():
    profiles = load_profile_set()
    result = plan(profiles, Workload(10.0, 256, 256), 64, 3.0, 1.0)
    assert result.status is PlanStatus.OPTIMAL and result.plan.gpus_used < 64
    assert plan(profiles, Workload(10.0, 256, 256), result.plan.gpus_used - 1, 3.0, 1.0).status is PlanStatus.OVERLOADED


def test_overloaded_says_how_many_gpus_serve_everything():
    profiles = load_profile_set()
    workload = Workload(40.0, 256, 256)
    result = plan(profiles, workload, 8, 3.0, 1.0)
    assert result.status is PlanStatus.OVERLOADED and 0 < result.plan.served_share < 1
    assert f"needs {result.gpus_needed} GPUs" in result.message
    assert plan(profiles, workload, result.gpus_needed, 3.0, 1.0).status is PlanStatus.OPTIMAL
    assert plan(profiles, workload, result.gpus_needed - 1, 3.0, 1.0).status is PlanStatus.OVERLOADED


def test_tight_slo_moves_to_higher_degrees():
    profiles = load_profile_set()
    result = plan(profiles, Workload(5.0, 256, 256), 64, 0.6, 5.0)
    assert result.has_plan and all(g.degree > 1 for g in result.plan.groups)


def test_zero_rate_needs_no_instances():
    result = plan(load_profile_set(), Workload(0.0, 256, 256), 8, 3.0, 1.0)
    assert result.status is PlanStatus.OPTIMAL and "no traffic" in result.message
    assert result.plan.instances == () and result.plan.gpus_used == 0 and result.plan.served_share == 1.0


def test_infeasible_quality_budget_says_what_would_do():
    profiles = load_profile_set()
    workload = Workload(5.0, 256, 256)
    result = plan(profiles, workload, 64, 0.3, 0.0)  # only low thresholds are fast enough
    assert result.status is PlanStatus.INFEASIBLE and result.plan is None
    assert "accurate enough" in result.message
    budget = float(re.search(r"quality budget >= ([\d.]+) points", result.message).group(1))
    scale = float(re.search(r"SLO scale >= ([\d.]+)", result.message).group(1))
    assert plan(profiles, workload, 64, 0.3, budget + 0.01).has_plan
    assert plan(profiles, workload, 64, scale * 1.01, 0.0).has_plan


def test_infeasible_deadline_says_which_slo_scale_would_do():
    profiles = load_profile_set()
    workload = Workload(5.0, 256, 256)
    result = plan(profiles, workload, 64, 0.05, 100.0)
    assert result.status is PlanStatus.INFEASIBLE and "even alone" in result.message
    scale = float(re.search(r"SLO scale >= ([\d.]+)", result.message).group(1))
    assert plan(profiles, workload, 64, scale * 1.01, 100.0).has_plan
    # with only 4 GPUs the fastest (8-GPU) instance is out of reach: a larger scale is needed
    small = plan(profiles, workload, 4, 0.05, 100.0)
    assert float(re.search(r"SLO scale >= ([\d.]+)", small.message).group(1)) > scale


def test_too_few_gpus_and_too_long_requests():
    profiles = make_profiles(degrees=(2,), kv_capacity_tokens=1000)
    assert "smallest profiled degree needs 2" in plan(profiles, Workload(1.0, 10, 10), 1, 3.0, 1.0).message
    long = plan(profiles, Workload(1.0, 5000, 100), 8, 3.0, 1.0)
    assert long.status is PlanStatus.INFEASIBLE and "KV cache" in long.message


@pytest.mark.parametrize("args,words", [
    ((Workload(-1.0, 256, 256), 8, 3.0, 1.0), "arrival rate"),
    ((Workload(math.nan, 256, 256), 8, 3.0, 1.0), "arrival rate"),
    ((Workload(1.0, 256, 256), -1, 3.0, 1.0), "gpus"),
    ((Workload(1.0, 256, 256), 2.5, 3.0, 1.0), "gpus"),
    ((Workload(1.0, 256, 256), 8, 0.0, 1.0), "SLO scale"),
    ((Workload(1.0, 256, 256), 8, math.inf, 1.0), "SLO scale"),
    ((Workload(1.0, 256, 256), 8, 3.0, -1.0), "quality budget"),
    ((Workload(1.0, 256, 0), 8, 3.0, 1.0), "output >= 1"),
])
def test_invalid_inputs_are_a_status_not_an_exception(args, words):
    result = plan(load_profile_set(), *args)
    assert result.status is PlanStatus.INVALID and words in result.message


def test_invalid_options_and_empty_profiles():
    workload = Workload(1.0, 256, 256)
    assert plan(load_profile_set(), workload, 8, 3, 1, PlannerOptions(utilization=1.5)).status is PlanStatus.INVALID
    assert plan(load_profile_set(), workload, 8, 3, 1, PlannerOptions(solver="nope")).status is PlanStatus.INVALID
    assert plan(make_profiles(degrees=()), workload, 8, 3, 1).status is PlanStatus.INVALID
    assert plan(make_profiles(settings=()), workload, 8, 3, 1).status is PlanStatus.INVALID


def test_evaluate_reproduces_the_plans_own_prediction_and_its_overload():
    profiles = load_profile_set()
    workload = Workload(30.0, 256, 256)
    chosen = plan(profiles, workload, 16, 3.0, 1.0).plan
    same = evaluate(chosen.instances, profiles, workload, 3.0, 1.0)
    assert same.plan.served_share == pytest.approx(chosen.served_share, abs=1e-6)
    assert same.plan.gpus_used == chosen.gpus_used
    doubled = evaluate(chosen.instances, profiles, workload.with_rate(60.0), 3.0, 1.0)
    assert doubled.status is PlanStatus.OVERLOADED and doubled.plan.served_share < 0.6
    assert evaluate(chosen.instances, profiles, workload.with_rate(0.0), 3.0, 1.0).plan.served_share == 1.0
    assert evaluate([(3, 0.9, 1)], profiles, workload, 3.0, 1.0).status is PlanStatus.INVALID


def test_plan_to_dict_round_trips_through_json():
    import json

    result = plan(load_profile_set(), Workload(10.0, 256, 256), 8, 3.0, 1.0)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["status"] == "optimal" and data["plan"]["gpus_used"] == result.plan.gpus_used
    groups = [(g["degree"], g["threshold"], g["kv_retention"], g["count"]) for g in data["plan"]["groups"] if g["count"]]
    assert groups == list(result.plan.instances)
    assert len(data["capacities"]) == len(capacity_table(load_profile_set(), Workload(10.0, 256, 256), 3.0).groups)


def test_planner_imports_neither_torch_nor_ray():
    import subprocess
    import sys

    code = "import sys, dilaserve.planner, dilaserve.cli.plan; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
