"""Re-plan only for a real gain, so the cluster does not flap."""

from __future__ import annotations

from dilaserve.planner import InstanceGroup, Plan, Workload, evaluate, load_profile_set, plan, replan_reason, should_replan


def _plan(instances, served, gpus=None, accuracy=0.8) -> Plan:
    groups = tuple(InstanceGroup(p, t, n, 0.0, 1.0, 1, accuracy) for p, t, n in instances)
    used = sum(p * n for p, _, n in instances) if gpus is None else gpus
    return Plan(groups, 10.0, 16, used, served, accuracy, 0.8, 0.79, 1.0, 0.01, "cbc")


def test_first_plan_is_always_applied_and_none_never_is():
    assert should_replan(None, _plan([(1, 0.9, 2)], 1.0))
    assert not should_replan(_plan([(1, 0.9, 2)], 1.0), None)


def test_same_instances_never_reconfigure():
    assert not should_replan(_plan([(1, 0.9, 2), (2, 0.5, 1)], 0.5), _plan([(2, 0.5, 1), (1, 0.9, 2)], 0.9))


def test_served_gain_must_reach_min_gain():
    old = _plan([(1, 0.9, 2)], 0.90)
    assert not should_replan(old, _plan([(1, 0.9, 3)], 0.91), min_gain=0.02)
    assert "more of the traffic" in replan_reason(old, _plan([(1, 0.9, 3)], 0.93), min_gain=0.02)


def test_freeing_gpus_at_equal_service():
    old = _plan([(1, 0.9, 4)], 1.0)
    assert "fewer GPUs" in replan_reason(old, _plan([(1, 0.9, 3)], 1.0))
    assert not should_replan(old, _plan([(1, 0.9, 3)], 1.0), min_gpus_freed=2)
    assert not should_replan(old, _plan([(1, 0.9, 2)], 0.9))  # frees GPUs but serves clearly less


def test_accuracy_gain_at_equal_cost():
    old = _plan([(1, 0.5, 2)], 1.0, accuracy=0.70)
    assert "raises accuracy" in replan_reason(old, _plan([(1, 0.9, 2)], 1.0, accuracy=0.75))
    assert not should_replan(old, _plan([(1, 0.9, 2)], 1.0, accuracy=0.702))


def test_small_load_wobble_keeps_the_running_plan():
    profiles = load_profile_set()
    running = plan(profiles, Workload(20.0, 256, 256), 32, 3.0, 1.0).plan
    for rate in (19.0, 20.5):  # the running instances, re-evaluated, vs a fresh plan at the new load
        now = evaluate(running.instances, profiles, Workload(rate, 256, 256), 3.0, 1.0).plan
        fresh = plan(profiles, Workload(rate, 256, 256), 32, 3.0, 1.0).plan
        assert not should_replan(now, fresh, min_gain=0.05, min_gpus_freed=2), (rate, now.instances, fresh.instances)
    doubled = Workload(40.0, 256, 256)
    now = evaluate(running.instances, profiles, doubled, 3.0, 1.0).plan
    assert should_replan(now, plan(profiles, doubled, 32, 3.0, 1.0).plan, min_gain=0.05)
