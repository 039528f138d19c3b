"""Routing policies: which replica gets a request. Pure logic (no Ray, no torch).

Each policy is a small class with one method, ``choose(candidates, budget_s)``, over
``ReplicaLoad`` snapshots the ingress builds from the replicas' predictions and its own count
of requests in flight. ``SlackRouter`` is DiLaServe's policy; ``RoundRobinRouter`` and
``PowerOfTwoRouter`` are the baselines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ReplicaLoad:
    name: str
    # Predicted seconds from now until the request would finish there (queueing included);
    # None when the policy does not need predictions or the replica gave none.
    finish_s: float | None = None
    num_in_flight: int = 0  # requests this ingress has sent there and not seen finish
    # False for a replica still pricing steps from its prior (fresh, no steps of its own yet)
    is_calibrated: bool = True


class Router(Protocol):
    # Whether the policy reads ``ReplicaLoad.finish_s`` (callers may skip building them if not).
    needs_predictions: bool

    def choose(self, candidates: Sequence[ReplicaLoad], budget_s: float | None = None) -> ReplicaLoad: ...


class SlackRouter:
    """The replica with the most predicted slack: budget minus predicted finish time.

    With a common budget that is the earliest predicted finish. Slacks within ``tie_s`` of the
    best count as equal, and then the replica with fewer requests in flight wins (then the
    earlier name): identical idle replicas predict identical times, and a burst of arrivals
    sees the same predictions before any replica has reported the work just sent to it.

    A replica still pricing steps from its prior (``is_calibrated`` False: a fresh one) gets the
    request first when nothing is in flight there and it predicts the request on time: a prior
    is usually more pessimistic than a busy replica's measured model, so by slack alone a new
    replica might never get the traffic that would calibrate it.
    """

    needs_predictions = True

    def __init__(self, tie_s: float = 1e-3):
        self.tie_s = tie_s

    def choose(self, candidates: Sequence[ReplicaLoad], budget_s: float | None = None) -> ReplicaLoad:
        _require(candidates)
        budget = 0.0 if budget_s is None else budget_s

        def slack(load: ReplicaLoad) -> float:
            return budget - (load.finish_s if load.finish_s is not None else float("inf"))

        fresh = [c for c in candidates if not c.is_calibrated and c.num_in_flight == 0 and slack(c) >= 0]
        if fresh:
            return min(fresh, key=lambda c: (-slack(c), c.name))
        best = max(slack(c) for c in candidates)
        near_best = [c for c in candidates if slack(c) >= best - self.tie_s]
        return min(near_best, key=lambda c: (c.num_in_flight, -slack(c), c.name))


class RoundRobinRouter:
    """Each replica in turn (baseline)."""

    needs_predictions = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[ReplicaLoad], budget_s: float | None = None) -> ReplicaLoad:
        _require(candidates)
        ordered = sorted(candidates, key=lambda c: c.name)
        choice = ordered[self._next % len(ordered)]
        self._next += 1
        return choice


class PowerOfTwoRouter:
    """Two replicas at random, the one with fewer requests in flight (baseline)."""

    needs_predictions = False

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[ReplicaLoad], budget_s: float | None = None) -> ReplicaLoad:
        _require(candidates)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return min((a, b), key=lambda c: (c.num_in_flight, c.name))


def make_router(policy: str, seed: int = 0) -> Router:
    if policy == "slack":
        return SlackRouter()
    if policy == "round_robin":
        return RoundRobinRouter()
    if policy == "power_of_two":
        return PowerOfTwoRouter(seed)
    raise ValueError(f"unknown routing policy {policy!r}; known: slack, round_robin, power_of_two")


def _require(candidates: Sequence[ReplicaLoad]) -> None:
    if not candidates:
        raise ValueError("no replica to route to")
