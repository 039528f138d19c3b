"""Whether a new plan is worth reconfiguring the cluster for (so it does not flap).

Compare like with like: ``old_plan`` should be what the *running* instances achieve at the
new load (``planner.evaluate(old.instances, ...)``), not the old plan's own prediction at the
old load. Changing only traffic shares is cheap (push router weights) and is never a reason
to reconfigure. Against flapping on the way down, plan the candidate at a slightly higher
rate (``workload.with_rate(rate * (1 + headroom))``) before asking whether it frees GPUs.
"""

from __future__ import annotations

from collections import Counter

from dilaserve.planner.result import Plan


def replan_reason(old_plan: Plan | None, new_plan: Plan | None, min_gain: float = 0.02, *,
                  min_gpus_freed: int = 1, min_accuracy_gain: float = 0.005) -> str | None:
    """Why to switch from ``old_plan`` to ``new_plan``, or None to keep the old one.

    Switch when the new plan serves at least ``min_gain`` more of the traffic (a share, 0.02
    = 2 points of SLO attainment); or serves about as much (within ``min_gain``) on at least
    ``min_gpus_freed`` fewer GPUs; or, on as many GPUs, raises accuracy by ``min_accuracy_gain``
    (a fraction) without serving less.
    """
    if new_plan is None:
        return None
    if old_plan is None:
        return "no plan is running"
    if Counter(old_plan.instances) == Counter(new_plan.instances):
        return None
    gain = new_plan.served_share - old_plan.served_share
    if gain >= min_gain:
        return f"serves {100 * gain:.1f} points more of the traffic within SLO"
    if gain > -min_gain and old_plan.gpus_used - new_plan.gpus_used >= min_gpus_freed:
        return f"serves as much on {old_plan.gpus_used - new_plan.gpus_used} fewer GPUs"
    if (gain >= 0 and new_plan.gpus_used <= old_plan.gpus_used
            and new_plan.accuracy - old_plan.accuracy >= min_accuracy_gain):
        return f"raises accuracy by {100 * (new_plan.accuracy - old_plan.accuracy):.1f} points"
    return None


def should_replan(old_plan: Plan | None, new_plan: Plan | None, min_gain: float = 0.02, **thresholds) -> bool:
    """True when ``replan_reason`` gives a reason (same arguments)."""
    return replan_reason(old_plan, new_plan, min_gain, **thresholds) is not None
