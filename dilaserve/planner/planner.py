"""The planner's entry points: ``plan`` (choose instances and traffic shares for a load) and
``evaluate`` (what a given set of instances achieves at a load).

Both take plain data (profiles, a workload, numbers) and always return a ``PlanResult``:
bad inputs, impossible constraints and solver failures come back as a status and a
message, never as an exception. The simulator and the controller call these two.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from dilaserve.planner.capacity import CapacityTable, GroupCapacity, capacity_table
from dilaserve.planner.ilp import SOLVERS, ILPSolution, SolverError, solve_ilp
from dilaserve.planner.profiles import ProfileSet
from dilaserve.planner.result import InstanceGroup, Plan, PlanResult, PlanStatus
from dilaserve.planner.workload import Workload

log = logging.getLogger(__name__)

_FULL = 1 - 1e-6  # a served share at least this is "all traffic"
_ACC_TOL = 1e-12


@dataclass(frozen=True)
class PlannerOptions:
    solver: str = "auto"  # auto (HiGHS if installed, else CBC), cbc, highs
    time_limit_s: float | None = 10.0  # per solver call
    utilization: float = 0.9  # share of the SLO capacity a plan may load an instance to


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _name(g: GroupCapacity) -> str:
    return f"p={g.degree}, t={g.threshold:g}" + (f", kv={g.kv_retention:g}" if g.kv_retention is not None else "")


def _check_inputs(profiles: ProfileSet, workload: Workload, gpus: int, slo_scale: float, quality_budget: float,
                  options: PlannerOptions) -> str | None:
    """The first thing wrong with the inputs, or None."""
    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        return f"gpus must be a whole number >= 0, got {gpus!r}"
    if not finite(workload.rate_rps) or workload.rate_rps < 0:
        return f"the arrival rate must be a finite number >= 0 req/s, got {workload.rate_rps!r}"
    if not finite(slo_scale) or slo_scale <= 0:
        return f"the SLO scale must be a finite number > 0, got {slo_scale!r}"
    if not finite(quality_budget) or quality_budget < 0:
        return f"the quality budget must be a finite number >= 0 accuracy points, got {quality_budget!r}"
    if workload.prompt_tokens < 0 or workload.output_tokens < 1:
        return (f"request lengths must be prompt >= 0 and output >= 1 tokens, got "
                f"{workload.prompt_tokens} and {workload.output_tokens}")
    if not 0 < options.utilization <= 1:
        return f"utilization must be in (0, 1], got {options.utilization}"
    if options.solver not in SOLVERS:
        return f"unknown solver {options.solver!r}; known: {', '.join(SOLVERS)}"
    if not profiles.latency.degrees:
        return "the latency profile holds no parallelism degree"
    if not profiles.quality.entries:
        return "the quality profile holds no threshold"
    return None


def _plan_from(table: CapacityTable, solution: ILPSolution, rate: float, gpus: int, best: float, floor: float) -> Plan:
    groups = tuple(
        InstanceGroup(g.degree, g.threshold, solution.counts.get(k, 0), solution.shares.get(k, 0.0), g.capacity_rps,
                      g.max_batch, g.accuracy, g.kv_retention)
        for k, g in enumerate(table.groups) if solution.counts.get(k) or solution.shares.get(k))
    return Plan(groups, rate, gpus, solution.gpus_used, solution.served_share, solution.accuracy, best, floor,
                table.deadline_s, solution.solve_time_s, solution.solver, solution.is_proven_optimal)


def _why_nothing_fits(table: CapacityTable, workload: Workload, gpus: int, slo_scale: float, floor: float,
                      best: float) -> str | None:
    """Why no traffic at all can be served, or None when some can."""
    fits = [g for g in table.groups if g.degree <= gpus]
    if not fits:
        smallest = min(g.degree for g in table.groups)
        return f"{gpus} GPUs hold no instance: the smallest profiled degree needs {smallest}"
    seq_len = workload.prompt_tokens + workload.output_tokens
    holdable = [g for g in fits if g.limited_by != "kv_capacity"]
    if not holdable:
        return f"a {seq_len}-token request does not fit in the KV cache of any instance of at most {gpus} GPUs"
    fast = [g for g in holdable if g.capacity_rps > 0]
    if not fast:
        quickest = min(holdable, key=lambda g: g.solo_latency_s)
        return (f"no instance meets the {table.deadline_s:.3g} s deadline even alone: the fastest setting "
                f"({_name(quickest)}) takes {quickest.solo_latency_s:.3g} s for a {workload.prompt_tokens}+"
                f"{workload.output_tokens}-token request; needs a SLO scale >= "
                f"{quickest.solo_latency_s / table.reference_latency_s:.3g} (now {slo_scale:g})")
    if not any(g.accuracy >= floor - _ACC_TOL for g in fast):
        top = max(fast, key=lambda g: g.accuracy)
        accurate = [g for g in holdable if g.accuracy >= floor - _ACC_TOL]
        text = (f"no setting fast enough for the {table.deadline_s:.3g} s deadline is accurate enough: the most "
                f"accurate of them ({_name(top)}) reaches {_pct(top.accuracy)}, below the floor {_pct(floor)} "
                f"(best {_pct(best)} minus the budget); needs a quality budget >= {100 * (best - top.accuracy):.2f} points")
        if accurate:
            quickest = min(accurate, key=lambda g: g.solo_latency_s)
            text += f" or a SLO scale >= {quickest.solo_latency_s / table.reference_latency_s:.3g}"
        return text
    return None


def _gpus_needed(table: CapacityTable, rate: float, floor: float, options: PlannerOptions) -> int | None:
    """The fewest GPUs that serve all traffic (None if the solver cannot say)."""
    eligible = [g for g in table.groups if g.capacity_rps > 0 and g.accuracy >= floor - _ACC_TOL]
    bound = min(math.ceil(rate / g.capacity_rps) * g.degree for g in eligible)  # one group alone suffices
    try:
        solution = solve_ilp(table.groups, gpus=bound, rate_rps=rate, min_accuracy=floor, solver=options.solver,
                             time_limit_s=options.time_limit_s)
    except SolverError:
        return None
    return solution.gpus_used if solution.served_share >= _FULL else None


def plan(profiles: ProfileSet, workload: Workload, gpus: int, slo_scale: float, quality_budget: float,
         options: PlannerOptions = PlannerOptions()) -> PlanResult:
    """Instances per (degree, threshold, kv_retention) and traffic shares for ``workload`` on
    ``gpus`` GPUs. Sparse KV is one more setting: chosen where the quality profile measured it,
    the cost model says it serves more (long contexts) and the quality budget allows.

    ``slo_scale``: a request's deadline is this times its latency alone at the reference
    setting. ``quality_budget``: accuracy points (1.0 = 0.01) the served traffic's mean
    accuracy may fall below the best threshold's.
    """
    problem = _check_inputs(profiles, workload, gpus, slo_scale, quality_budget, options)
    if problem:
        return PlanResult(PlanStatus.INVALID, problem)
    table = capacity_table(profiles, workload, slo_scale, options.utilization)
    best = max(g.accuracy for g in table.groups)
    floor = best - quality_budget / 100
    rate = float(workload.rate_rps)
    common = {"deadline_s": table.deadline_s, "capacities": table.groups}
    if rate == 0:
        empty = Plan((), 0.0, gpus, 0, 1.0, best, best, floor, table.deadline_s, 0.0, "none")
        return PlanResult(PlanStatus.OPTIMAL, "no traffic (0 req/s): no instance is needed", empty, **common)
    reason = _why_nothing_fits(table, workload, gpus, slo_scale, floor, best)
    if reason:
        return PlanResult(PlanStatus.INFEASIBLE, f"cannot serve any of {rate:g} req/s: {reason}", **common)
    try:
        solution = solve_ilp(table.groups, gpus=gpus, rate_rps=rate, min_accuracy=floor, solver=options.solver,
                             time_limit_s=options.time_limit_s)
    except SolverError as exc:
        return PlanResult(PlanStatus.SOLVER_ERROR, str(exc), **common)
    result = _plan_from(table, solution, rate, gpus, best, floor)
    summary = (f"within the {table.deadline_s:.3g} s deadline on {result.gpus_used} of {gpus} GPUs at "
               f"{_pct(result.accuracy)} accuracy (floor {_pct(floor)})")
    if result.served_share >= _FULL:
        log.info("plan: all %g req/s %s", rate, summary)
        return PlanResult(PlanStatus.OPTIMAL, f"serves all {rate:g} req/s {summary}", result, **common)
    needed = _gpus_needed(table, rate, floor, options)
    more = f"; all of it needs {needed} GPUs" if needed is not None else ""
    return PlanResult(PlanStatus.OVERLOADED,
                      f"serves {_pct(result.served_share)} of {rate:g} req/s ({result.served_rps:.3g} req/s) "
                      f"{summary}{more}", result, gpus_needed=needed, **common)


def _instance_keys(instances: Sequence[tuple]) -> list[tuple[int, float, float | None, int]] | None:
    """``(degree, threshold, kv_retention, count)`` rows; ``(degree, threshold, count)`` rows
    (written before sparse KV) are dense. None when a row is neither."""
    rows = []
    for row in instances:
        if len(row) == 3:
            rows.append((row[0], row[1], None, row[2]))
        elif len(row) == 4:
            rows.append(tuple(row))
        else:
            return None
    return rows


def evaluate(instances: Sequence[tuple], profiles: ProfileSet, workload: Workload, slo_scale: float,
             quality_budget: float, options: PlannerOptions = PlannerOptions()) -> PlanResult:
    """The best routing of ``workload`` over fixed ``(degree, threshold, kv_retention, count)``
    instances (``(degree, threshold, count)``: dense): what a running cluster achieves at a new
    load (compare it with ``plan`` to decide whether reconfiguring is worth it)."""
    rows = _instance_keys(instances)
    if rows is None:
        return PlanResult(PlanStatus.INVALID, "instances must be (degree, threshold, kv_retention, count) rows")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for *_, n in rows):
        return PlanResult(PlanStatus.INVALID, "instance counts must be whole numbers >= 0")
    gpus = sum(p * n for p, *_, n in rows)
    problem = _check_inputs(profiles, workload, gpus, slo_scale, quality_budget, options)
    if problem:
        return PlanResult(PlanStatus.INVALID, problem)
    table = capacity_table(profiles, workload, slo_scale, options.utilization)
    index = {g.key: k for k, g in enumerate(table.groups)}
    counts: dict[int, int] = {}
    for p, t, r, n in rows:
        if (p, t, r) not in index:
            sparse = f" with kv_retention {r:g}" if r is not None else ""
            return PlanResult(PlanStatus.INVALID,
                              f"instances of degree {p} at threshold {t:g}{sparse} are not in the profiles")
        counts[index[(p, t, r)]] = counts.get(index[(p, t, r)], 0) + n
    best = max(g.accuracy for g in table.groups)
    floor = best - quality_budget / 100
    rate = float(workload.rate_rps)
    common = {"deadline_s": table.deadline_s, "capacities": table.groups}
    if rate == 0:
        solution = ILPSolution({k: c for k, c in counts.items() if c}, {}, 1.0, gpus, best, 0.0, "none")
    else:
        try:
            solution = solve_ilp(table.groups, gpus=gpus, rate_rps=rate, min_accuracy=floor, solver=options.solver,
                                 time_limit_s=options.time_limit_s, fixed_counts=counts)
        except SolverError as exc:
            return PlanResult(PlanStatus.SOLVER_ERROR, str(exc), **common)
    result = _plan_from(table, solution, rate, gpus, best, floor)
    status = PlanStatus.OPTIMAL if result.served_share >= _FULL else PlanStatus.OVERLOADED
    return PlanResult(status, f"these instances serve {_pct(result.served_share)} of {rate:g} req/s "
                      f"within the {table.deadline_s:.3g} s deadline", result, **common)
