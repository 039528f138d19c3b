"""``simulate(trace, cluster, policies) -> list[RequestRecord]``: a trace through a simulated cluster.

The event loop is the trace: for each arrival, in order, the cluster first runs every internal
event up to it (step ends at step fidelity, departures at fast fidelity); then the simulated
ingress assigns the deadline, admits or refuses and routes from the replicas' predictions at
that instant (``SimIngress``), and the chosen replica takes the request. Then the cluster
drains. Records are the ones ``dilaserve replay`` writes, so ``replay.metrics`` and
``replay.report`` read simulated and real runs alike.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from dilaserve.replay.records import RequestRecord, Status
from dilaserve.replay.trace import Trace
from dilaserve.serving.admission import SLOTargets
from dilaserve.sim.config import ClusterConfig, SimPolicies
from dilaserve.sim.fast_cluster import FastCluster
from dilaserve.sim.ingress import NO_TARGETS, SimIngress
from dilaserve.sim.step_replica import StepCluster
from dilaserve.sim.workload import Workload

log = logging.getLogger(__name__)


def simulate(trace: Trace | Workload, cluster: ClusterConfig,
             policies: SimPolicies = SimPolicies()) -> list[RequestRecord]:
    """Replays ``trace`` open-loop on the simulated ``cluster``; one record per request, in
    trace order, with times in seconds of the trace's clock."""
    workload = trace if isinstance(trace, Workload) else Workload.from_trace(trace)
    if policies.fidelity == "fast" and any(g.engine.load_control for g in cluster.groups):
        log.warning("fast fidelity does not model load control (threshold lowering); use --fidelity step")
    names = [name for name, _ in cluster.replicas()]
    ingress = SimIngress(names, policies.routing, policies.admission, policies.slo)
    make_cluster = StepCluster if policies.fidelity == "step" else FastCluster
    sim = make_cluster(cluster, policies, workload, ingress.released)

    n = len(workload)
    replica_of = [-1] * n
    budget_s = [0.0] * n
    retry_after_s: dict[int, int] = {}
    errors: dict[int, str] = {}
    arrivals, prompts, outputs = (a.tolist() for a in (workload.arrival_s, workload.prompt_tokens,
                                                       workload.output_tokens))
    baseline, slo_scale = policies.baseline, policies.slo.slo_scale
    for i in range(n):
        now = arrivals[i]
        sim.advance(now)
        targets = NO_TARGETS if baseline is None else SLOTargets(slo_scale * baseline(prompts[i], outputs[i]))
        dispatch = ingress.dispatch(sim.estimates(now, i), outputs[i], 0.0, targets)
        budget_s[i] = dispatch.budget_s
        if dispatch.replica < 0:
            retry_after_s[i] = dispatch.retry_after_s
            continue
        error = sim.submit(now, dispatch.replica, i, now + dispatch.budget_s)
        if error is not None:
            errors[i] = error
            continue
        ingress.sent(dispatch.replica)
        replica_of[i] = dispatch.replica
    sim.advance(math.inf)
    if any(ingress.in_flight):
        raise RuntimeError(f"the simulation ended with requests in flight: {sum(ingress.in_flight)}")
    thresholds = [_threshold(group, policies) for _, group in cluster.replicas()]
    return _records(workload, cluster.overhead_s, policies.system, replica_of, budget_s, retry_after_s, errors,
                    sim.first_token_s, sim.finish_s, thresholds)


def _threshold(group, policies: SimPolicies) -> float:
    floor = policies.slo.quality_floor
    return group.default_threshold if floor is None else max(group.default_threshold, floor)


def _records(workload: Workload, overhead_s: float, system: str, replica_of: list[int], budget_s: list[float],
             retry_after_s: dict[int, int], errors: dict[int, str], first_token_s: np.ndarray,
             finish_s: np.ndarray, thresholds: list[float]) -> list[RequestRecord]:
    arrivals, prompts, outputs = (a.tolist() for a in (workload.arrival_s, workload.prompt_tokens,
                                                       workload.output_tokens))
    firsts, finishes = (first_token_s + overhead_s).tolist(), (finish_s + overhead_s).tolist()
    records = []
    for i, replica in enumerate(replica_of):
        arrival = arrivals[i]
        if replica >= 0:
            record = RequestRecord(i, arrival, arrival, firsts[i], finishes[i], prompts[i], outputs[i], outputs[i],
                                   Status.OK, system, 200, budget_s[i], None, None, thresholds[replica])
        elif i in errors:
            record = RequestRecord(i, arrival, arrival, None, arrival, prompts[i], outputs[i], 0, Status.ERROR, system,
                                   400, budget_s[i], error=errors[i])
        else:
            record = RequestRecord(i, arrival, arrival, None, arrival, prompts[i], outputs[i], 0, Status.REFUSED,
                                   system, 429, budget_s[i], float(retry_after_s[i]))
        records.append(record)
    return records
