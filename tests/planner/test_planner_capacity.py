"""Capacity of one instance under the SLO, from the engine's cost model."""

from __future__ import annotations

import pytest

from dilaserve.engine.cost_model import batch_work_s, request_work, work_s
from dilaserve.planner.capacity import best_setting, capacity_table
from dilaserve.planner.profiles import load_profile_set
from dilaserve.planner.workload import Workload
from tests.planner.helpers import COSTS, make_profiles


@pytest.mark.parametrize("slo_scale", [1.0, 1.5, 3.0, 10.0])
@pytest.mark.parametrize("lengths", [(64, 32), (256, 256), (2000, 400)])
def test_capacity_never_falls_as_the_threshold_falls(slo_scale, lengths):
    profiles = load_profile_set()  # 8 thresholds (dense and sparse), tokens per step rising as the threshold falls
    table = capacity_table(profiles, Workload(1.0, *lengths), slo_scale)
    for degree, retention in {(g.degree, g.kv_retention) for g in table.groups}:
        row = sorted((g for g in table.groups if (g.degree, g.kv_retention) == (degree, retention)),
                     key=lambda g: -g.threshold)
        assert [g.tokens_per_step for g in row] == sorted(g.tokens_per_step for g in row)
        caps = [g.capacity_rps for g in row]
        assert caps == sorted(caps), f"degree {degree}: {caps}"
        assert [g.solo_latency_s for g in row] == sorted((g.solo_latency_s for g in row), reverse=True)


def test_max_batch_is_the_largest_within_the_deadline():
    profiles = make_profiles(degrees=(1,))
    workload = Workload(1.0, 256, 128)
    table = capacity_table(profiles, workload, slo_scale=4.0, utilization=1.0)
    for g in table.groups:
        work = request_work(384, 128, 32, g.tokens_per_step, "dual")
        assert g.solo_latency_s == pytest.approx(work_s(COSTS[1], work))
        assert g.max_batch >= 1
        assert batch_work_s(COSTS[1], [work] * g.max_batch) <= table.deadline_s * (1 + 1e-9)
        assert batch_work_s(COSTS[1], [work] * (g.max_batch + 1)) > table.deadline_s
        assert g.capacity_rps == pytest.approx(g.max_batch / g.batch_latency_s)


def test_deadline_is_scale_times_solo_latency_at_the_best_setting_on_the_smallest_degree():
    profiles = make_profiles(degrees=(1, 2))
    table = capacity_table(profiles, Workload(1.0, 100, 100), slo_scale=1.0)
    assert (table.reference_degree, table.reference_threshold) == (1, best_setting(profiles).threshold)
    reference = table.get(1, table.reference_threshold)
    assert table.deadline_s == pytest.approx(reference.solo_latency_s)
    assert reference.max_batch == 1  # alone it just meets a scale of 1
    assert table.get(2, table.reference_threshold).max_batch >= 1  # more GPUs: faster


def test_a_solo_miss_has_no_capacity():
    table = capacity_table(make_profiles(degrees=(1,)), Workload(1.0, 256, 256), slo_scale=0.5)
    slow = table.get(1, 0.95)
    assert slow.capacity_rps == 0 and slow.max_batch == 0 and slow.limited_by == "deadline"


def test_running_and_kv_limits_cap_the_batch():
    workload = Workload(1.0, 200, 56)
    by_running = capacity_table(make_profiles(degrees=(1,), max_running=3), workload, slo_scale=100.0)
    assert all(g.max_batch == 3 and g.limited_by == "max_running" for g in by_running.groups)
    by_kv = capacity_table(make_profiles(degrees=(1,), kv_capacity_tokens=256 * 5 + 10), workload, slo_scale=100.0)
    assert all(g.max_batch == 5 and g.limited_by == "kv_capacity" for g in by_kv.groups)
    none_fit = capacity_table(make_profiles(degrees=(1,), kv_capacity_tokens=100), workload, slo_scale=100.0)
    assert all(g.capacity_rps == 0 and g.limited_by == "kv_capacity" for g in none_fit.groups)


def test_utilization_scales_capacity():
    workload = Workload(1.0, 256, 256)
    full = capacity_table(make_profiles(), workload, 3.0, utilization=1.0)
    part = capacity_table(make_profiles(), workload, 3.0, utilization=0.5)
    for a, b in zip(full.groups, part.groups):
        assert b.capacity_rps == pytest.approx(0.5 * a.capacity_rps)
