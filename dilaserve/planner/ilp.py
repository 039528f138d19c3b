"""The planner's integer program, solved lexicographically with PuLP.

Variables, for each group ``k`` = (degree ``p``, threshold ``t``, sparse-KV retention ``r``) of a
capacity table (dense and sparse are just different groups, with their own capacity and accuracy):
``n[k]`` integer instances, ``x[k]`` in [0, 1] the share of all traffic they take.

    sum_k p_k n[k]                     <= G                (GPUs)
    x[k] * rate                        <= n[k] * cap[k]    (each group within its SLO capacity)
    sum_k x[k]                         <= 1
    sum_k x[k] * (acc[k] - acc_min)    >= 0                (served traffic's mean accuracy >= acc_min)

The objective is lexicographic, by three solves of the same model rather than one weighted
sum (exact, and free of weights that must outgrow the GPU count): (1) maximise the share
served, (2) fix it and minimise GPUs, (3) fix both and maximise traffic-weighted accuracy.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pulp

from dilaserve.planner.capacity import GroupCapacity

log = logging.getLogger(__name__)

SOLVERS = ("auto", "cbc", "highs")
_SHARE_TOL = 1e-7  # how far a later stage may give back the share served in stage 1


class SolverError(RuntimeError):
    """The solver did not return a solution (unavailable, crashed, or out of time with none)."""


@dataclass(frozen=True)
class ILPSolution:
    counts: dict[int, int]  # group index -> instances
    shares: dict[int, float]  # group index -> share of all traffic
    served_share: float
    gpus_used: int
    accuracy: float  # traffic-weighted over the served share (0 when nothing is served)
    solve_time_s: float
    solver: str
    is_proven_optimal: bool = True
    stage_times_s: tuple[float, ...] = field(default=())


def resolve_solver(name: str = "auto", time_limit_s: float | None = None):
    """The PuLP solver object and its name: HiGHS when ``highspy`` is importable (for
    ``auto``), else the CBC binary that PuLP ships."""
    if name not in SOLVERS:
        raise SolverError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    has_highs = importlib.util.find_spec("highspy") is not None
    if name == "highs" and not has_highs:
        raise SolverError("solver 'highs' asked for but highspy is not installed (pip install highspy)")
    if name == "highs" or (name == "auto" and has_highs):
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s), "highs"
    with warnings.catch_warnings():
        # PuLP 3.3 (pinned) ships CBC behind this class and calls it deprecated for PuLP 4,
        # where CBC comes from pulp[cbc] through COIN_CMD.
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s), "cbc"


def solve_ilp(groups: Sequence[GroupCapacity], *, gpus: int, rate_rps: float, min_accuracy: float,
              solver: str = "auto", time_limit_s: float | None = None,
              fixed_counts: Mapping[int, int] | None = None) -> ILPSolution:
    """Solve the program over ``groups`` (indices into it key the answer).

    ``fixed_counts`` pins ``n`` (absent groups at 0) and only routes traffic: what a running
    cluster would achieve at this load. Raises ``SolverError`` when no solution comes back.
    """
    backend, solver_name = resolve_solver(solver, time_limit_s)
    prob = pulp.LpProblem("dilaserve_plan", pulp.LpMaximize)
    n, x = {}, {}
    for k, g in enumerate(groups):
        if fixed_counts is not None:
            low = high = int(fixed_counts.get(k, 0))
        else:
            low, high = 0, (gpus // g.degree if g.capacity_rps > 0 else 0)
        n[k] = prob.add_variable(f"n_{k}", low, high, cat=pulp.LpInteger)
        x[k] = prob.add_variable(f"x_{k}", 0, 1 if g.capacity_rps > 0 else 0)
        prob += x[k] * rate_rps <= n[k] * g.capacity_rps, f"capacity_{k}"
    used = pulp.lpSum(g.degree * n[k] for k, g in enumerate(groups))
    served = pulp.lpSum(x.values())
    accuracy = pulp.lpSum(g.accuracy * x[k] for k, g in enumerate(groups))
    if fixed_counts is None:
        prob += used <= gpus, "gpus"
    prob += served <= 1, "one"
    prob += pulp.lpSum((g.accuracy - min_accuracy) * x[k] for k, g in enumerate(groups)) >= 0, "accuracy"

    times: list[float] = []
    proven = True

    def run(objective, sense) -> None:
        nonlocal proven
        prob.setObjective(objective)
        prob.sense = sense
        start = time.perf_counter()
        try:
            prob.solve(backend)
        except pulp.PulpSolverError as exc:
            raise SolverError(f"{solver_name} failed: {exc}") from None
        times.append(time.perf_counter() - start)
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            raise SolverError(f"{solver_name} returned no solution ({pulp.LpStatus[prob.status]})")
        proven = proven and prob.sol_status == pulp.LpSolutionOptimal

    run(served, pulp.LpMaximize)
    best_served = min(1.0, max(0.0, pulp.value(served) or 0.0))
    if best_served > _SHARE_TOL:
        prob += served >= best_served - _SHARE_TOL, "keep_served"
        if fixed_counts is None:
            run(used, pulp.LpMinimize)
            prob += used <= round(pulp.value(used)), "keep_gpus"
        run(accuracy, pulp.LpMaximize)

    counts = {k: int(round(v.value() or 0)) for k, v in n.items()}
    shares = {k: min(1.0, max(0.0, v.value() or 0.0)) for k, v in x.items()}
    total = sum(shares.values())
    if total <= _SHARE_TOL:  # nothing served: no instance is worth running
        shares = {k: 0.0 for k in shares}
        counts = dict(counts) if fixed_counts is not None else {k: 0 for k in counts}
        total = 0.0
    mean_accuracy = sum(groups[k].accuracy * s for k, s in shares.items()) / total if total else 0.0
    return ILPSolution(
        counts={k: c for k, c in counts.items() if c}, shares={k: s for k, s in shares.items() if s > _SHARE_TOL},
        served_share=min(1.0, total), gpus_used=sum(groups[k].degree * c for k, c in counts.items()),
        accuracy=mean_accuracy, solve_time_s=sum(times), solver=solver_name, is_proven_optimal=proven,
        stage_times_s=tuple(times))
