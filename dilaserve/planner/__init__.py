"""The planner: how many instances of each parallelism degree to run, at which confidence
threshold, dense or with sparse KV (at which retention), and how to split traffic over them,
so the most traffic meets its SLO while accuracy stays within a budget of the best (an
integer program, solved with PuLP).

Files: ``profiles`` (the latency and quality profile formats), ``workload`` (rate and request
lengths), ``capacity`` (requests/s one instance serves within SLO, from the engine's cost
model), ``ilp`` (the program), ``planner`` (``plan`` and ``evaluate``, the entry points),
``result`` (``Plan``, ``PlanResult``), ``hysteresis`` (whether a new plan is worth applying).
Imports neither torch nor Ray.
"""

from dilaserve.planner.capacity import CapacityTable, GroupCapacity, capacity_table
from dilaserve.planner.hysteresis import replan_reason, should_replan
from dilaserve.planner.planner import PlannerOptions, evaluate, plan
from dilaserve.planner.profiles import (
    DegreeProfile, LatencyProfile, ProfileError, ProfileSet, QualityEntry, QualityProfile, load_profile_set,
)
from dilaserve.planner.result import InstanceGroup, Plan, PlanResult, PlanStatus
from dilaserve.planner.workload import Workload, WorkloadError, load_workload

__all__ = [
    "CapacityTable", "DegreeProfile", "GroupCapacity", "InstanceGroup", "LatencyProfile", "Plan", "PlanResult",
    "PlanStatus", "PlannerOptions", "ProfileError", "ProfileSet", "QualityEntry", "QualityProfile", "Workload",
    "WorkloadError", "capacity_table", "evaluate", "load_profile_set", "load_workload", "plan", "replan_reason",
    "should_replan",
]
