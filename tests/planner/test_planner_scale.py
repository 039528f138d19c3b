"""The planner at cluster scale: 64 GPUs, 4 parallelism degrees, 8 thresholds, dense and sparse KV."""

from __future__ import annotations

from dilaserve.planner import PlanStatus, Workload, load_profile_set, plan


def test_64_gpus_4_degrees_16_settings_solves_fast():
    profiles = load_profile_set()
    assert len(profiles.latency.degrees) == 4 and len(profiles.quality.settings()) == 16
    times = []
    for rate, slo_scale in ((100.0, 3.0), (300.0, 3.0), (40.0, 0.8)):  # fits, overloaded, tight SLO
        result = plan(profiles, Workload(rate, 256, 256), 64, slo_scale, 1.0)
        assert result.status in (PlanStatus.OPTIMAL, PlanStatus.OVERLOADED), result.message
        times.append(result.plan.solve_time_s)
        print(f"64 GPUs, rate {rate:g}, slo {slo_scale:g}: {result.status.value}, "
              f"solve {1000 * result.plan.solve_time_s:.0f} ms ({result.plan.solver})")
    assert max(times) < 5.0  # target < 1 s; generous for a loaded CI machine
