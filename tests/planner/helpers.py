"""Small builders for planner tests: profile sets, capacity groups, and a brute-force planner."""

from __future__ import annotations

import itertools
from typing import Sequence

from dilaserve.engine.cost_model import StepCost
from dilaserve.planner.capacity import GroupCapacity
from dilaserve.planner.profiles import DegreeProfile, LatencyProfile, ProfileSet, QualityEntry, QualityProfile

# (threshold, accuracy, tokens decided per step): lower thresholds decide more, less accurately.
SETTINGS = ((0.95, 0.80, 2.0), (0.8, 0.78, 4.0), (0.5, 0.70, 8.0))
COSTS = {1: StepCost(6e-3, 3.2e-5, 1.3e-7), 2: StepCost(4e-3, 1.8e-5, 7e-8),
         4: StepCost(3e-3, 1e-5, 3.6e-8), 8: StepCost(2.6e-3, 6.2e-6, 2e-8)}


def make_profiles(degrees: Sequence[int] = (1, 2), settings=SETTINGS, *, block_size: int = 32,
                  max_running: int = 256, kv_capacity_tokens: int = 1_000_000, cache: str = "dual") -> ProfileSet:
    latency = LatencyProfile(tuple(DegreeProfile(p, COSTS[p], max_running, kv_capacity_tokens * p) for p in degrees),
                             cache)
    quality = QualityProfile(block_size, tuple(QualityEntry(t, a, tps, block_size) for t, a, tps in settings))
    return ProfileSet(latency, quality, "test")


def make_group(degree: int, threshold: float, accuracy: float, capacity_rps: float) -> GroupCapacity:
    return GroupCapacity(degree, threshold, accuracy, 1.0, 1.0, 1 if capacity_rps else 0, 1.0, capacity_rps, "deadline")


def best_routing(groups: Sequence[GroupCapacity], counts: Sequence[int], rate: float, floor: float) -> tuple[float, float]:
    """(served share, mean accuracy of served traffic) of the best routing over fixed counts.

    Served share: every group at or above the accuracy floor is used to its limit (that only
    adds served traffic and accuracy slack); then groups below the floor, least deficit
    first, while the slack lasts. Accuracy at that share: fill the highest accuracy first
    (the optimum of a fractional knapsack with unit weights).
    """
    limits = [min(1.0, n * g.capacity_rps / rate) for g, n in zip(groups, counts)]
    order = sorted(range(len(groups)), key=lambda k: -(groups[k].accuracy - floor))
    served, slack = 0.0, 0.0
    for k in order:
        room = 1.0 - served
        deficit = floor - groups[k].accuracy
        take = min(limits[k], room) if deficit <= 0 else min(limits[k], room, slack / deficit)
        served += take
        slack -= take * deficit
    accuracy_sum, left = 0.0, served
    for k in sorted(range(len(groups)), key=lambda k: -groups[k].accuracy):
        take = min(limits[k], left)
        accuracy_sum += take * groups[k].accuracy
        left -= take
    return served, (accuracy_sum / served if served > 0 else 0.0)


def brute_force(groups: Sequence[GroupCapacity], gpus: int, rate: float, floor: float) -> tuple[float, int, float]:
    """The lexicographic optimum (served share, GPUs, accuracy) over every instance-count vector."""
    best = None
    ranges = [range(gpus // g.degree + 1) for g in groups]
    for counts in itertools.product(*ranges):
        used = sum(g.degree * n for g, n in zip(groups, counts))
        if used > gpus:
            continue
        served, accuracy = best_routing(groups, counts, rate, floor)
        if served <= 1e-12:
            used, accuracy = 0, 0.0  # nothing served: the optimum runs nothing
        key = (round(served, 9), -used, round(accuracy, 9))
        if best is None or key > best[0]:
            best = (key, (served, used, accuracy))
    return best[1]
