"""What the planner answers: a ``Plan`` (instances, traffic shares, predictions) inside a
``PlanResult`` that always says how it went and why, in words a person can act on."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dilaserve.planner.capacity import GroupCapacity


class PlanStatus(str, Enum):
    OPTIMAL = "optimal"  # all traffic served within SLO and the quality budget
    OVERLOADED = "overloaded"  # a plan, but it serves only part of the traffic within SLO
    INFEASIBLE = "infeasible"  # no traffic at all can be served under these constraints
    INVALID = "invalid"  # the inputs themselves are wrong (negative rate, empty profiles, ...)
    SOLVER_ERROR = "solver_error"  # the solver gave no answer


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` instances of ``degree`` GPUs each, decoding at ``threshold`` with sparse KV at
    ``kv_retention`` (None: dense)."""

    degree: int
    threshold: float
    count: int
    traffic_share: float  # share of all arriving traffic routed to the group
    capacity_rps: float  # per instance, within SLO
    max_batch: int  # requests in flight per instance the plan assumes
    accuracy: float
    kv_retention: float | None = None

    @property
    def gpus(self) -> int:
        return self.degree * self.count

    @property
    def key(self) -> tuple[int, float, float | None]:
        return (self.degree, self.threshold, self.kv_retention)

    def to_dict(self) -> dict[str, Any]:
        return {"degree": self.degree, "threshold": self.threshold, "kv_retention": self.kv_retention,
                "count": self.count, "gpus": self.gpus, "traffic_share": self.traffic_share,
                "capacity_rps": self.capacity_rps, "max_batch": self.max_batch, "accuracy": self.accuracy}


@dataclass(frozen=True)
class Plan:
    groups: tuple[InstanceGroup, ...]  # degree ascending, threshold descending, dense before sparse
    rate_rps: float
    gpus_available: int
    gpus_used: int
    served_share: float  # predicted SLO attainment: share of arrivals served within deadline
    accuracy: float  # predicted traffic-weighted accuracy of the served traffic (fraction)
    best_accuracy: float
    min_accuracy: float  # best_accuracy - quality budget
    deadline_s: float  # for the representative request
    solve_time_s: float
    solver: str
    is_proven_optimal: bool = True

    @property
    def instances(self) -> tuple[tuple[int, float, float | None, int], ...]:
        """``(degree, threshold, kv_retention, count)`` of every group that runs instances
        (``kv_retention`` None: dense)."""
        return tuple((*g.key, g.count) for g in self.groups if g.count)

    @property
    def traffic_shares(self) -> dict[tuple[int, float, float | None], float]:
        return {g.key: g.traffic_share for g in self.groups if g.traffic_share}

    @property
    def served_rps(self) -> float:
        return self.served_share * self.rate_rps

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "rate_rps": self.rate_rps,
                "gpus_available": self.gpus_available, "gpus_used": self.gpus_used,
                "served_share": self.served_share, "served_rps": self.served_rps, "accuracy": self.accuracy,
                "best_accuracy": self.best_accuracy, "min_accuracy": self.min_accuracy,
                "deadline_s": self.deadline_s, "solve_time_s": self.solve_time_s, "solver": self.solver,
                "is_proven_optimal": self.is_proven_optimal}


@dataclass(frozen=True)
class PlanResult:
    status: PlanStatus
    message: str  # what was decided, or what cannot be met and why
    plan: Plan | None = None  # present for OPTIMAL and OVERLOADED
    deadline_s: float | None = None
    gpus_needed: int | None = None  # GPUs that would serve all traffic (OVERLOADED only)
    capacities: tuple[GroupCapacity, ...] = field(default=())  # every (degree, threshold, kv_retention) considered

    @property
    def has_plan(self) -> bool:
        return self.plan is not None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "message": self.message,
                "plan": self.plan.to_dict() if self.plan else None, "deadline_s": self.deadline_s,
                "gpus_needed": self.gpus_needed,
                "capacities": [{"degree": c.degree, "threshold": c.threshold, "kv_retention": c.kv_retention,
                                "accuracy": c.accuracy,
                                "tokens_per_step": c.tokens_per_step, "solo_latency_s": c.solo_latency_s,
                                "max_batch": c.max_batch, "batch_latency_s": c.batch_latency_s,
                                "capacity_rps": c.capacity_rps, "limited_by": c.limited_by}
                               for c in self.capacities]}
