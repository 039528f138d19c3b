"""The integer program against a brute-force search, on small instances."""

from __future__ import annotations

import importlib.util
import random

import pytest

from dilaserve.planner.ilp import SolverError, resolve_solver, solve_ilp
from tests.planner.helpers import brute_force, make_group


def _random_instance(rng: random.Random):
    degrees = (1, 2)
    thresholds = ((0.95, rng.uniform(0.78, 0.82)), (0.8, rng.uniform(0.72, 0.78)), (0.5, rng.uniform(0.6, 0.72)))
    groups = []
    for p in degrees:
        for t, acc in thresholds:
            # higher degree and lower threshold give more capacity; a group may miss the SLO (0)
            cap = 0.0 if rng.random() < 0.15 else rng.uniform(0.5, 3.0) * p ** 0.8 * (1 + (0.95 - t))
            groups.append(make_group(p, t, acc, cap))
    return groups


HAS_HIGHS = importlib.util.find_spec("highspy") is not None
SOLVERS = ["cbc", pytest.param("highs", marks=pytest.mark.skipif(not HAS_HIGHS, reason="highspy not installed"))]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(40))
def test_ilp_matches_brute_force(seed, solver):
    rng = random.Random(seed)
    groups = _random_instance(rng)
    gpus = rng.randint(1, 4)
    rate = rng.choice([0.5, 2.0, 5.0, 12.0])
    best = max(g.accuracy for g in groups)
    floor = best - rng.choice([0.0, 0.01, 0.03, 0.2])
    solution = solve_ilp(groups, gpus=gpus, rate_rps=rate, min_accuracy=floor, solver=solver)
    served, used, accuracy = brute_force(groups, gpus, rate, floor)
    assert solution.served_share == pytest.approx(served, abs=1e-5)
    assert solution.gpus_used == used
    assert solution.accuracy == pytest.approx(accuracy, abs=1e-5)
    # and the answer itself satisfies every constraint
    assert solution.gpus_used <= gpus
    for k, share in solution.shares.items():
        assert share * rate <= solution.counts.get(k, 0) * groups[k].capacity_rps + 1e-6
    if solution.served_share > 0:
        assert solution.accuracy >= floor - 1e-6


def test_fixed_counts_only_route():
    groups = [make_group(1, 0.9, 0.8, 2.0), make_group(1, 0.5, 0.7, 4.0)]
    solution = solve_ilp(groups, gpus=10, rate_rps=10.0, min_accuracy=0.7, fixed_counts={0: 1, 1: 1})
    assert solution.counts == {0: 1, 1: 1} and solution.gpus_used == 2
    assert solution.served_share == pytest.approx(0.6)


def test_unknown_or_missing_solver_is_a_solver_error():
    with pytest.raises(SolverError, match="unknown solver"):
        resolve_solver("gurobi")
    if not HAS_HIGHS:
        with pytest.raises(SolverError, match="highspy"):
            resolve_solver("highs")
