"""``simulate(trace, cluster, policies) -> list[RequestRecord]``: a trace through a simulated cluster.

The event loop is the trace: for each arrival, in order, the cluster first runs every internal
event up to it (step ends at step fidelity, departures at fast fidelity); then the simulated
ingress assigns the deadline, admits or refuses and routes from the replicas' predictions at
that instant (``SimIngress``), and the chosen replica takes the request. Then the cluster
drains. Records are the ones ``dilaserve replay`` writes, so ``replay.metrics`` and
``replay.report`` read simulated and real runs alike.

``Replay`` is that loop one arrival at a time, so that ``controlled`` can run the controller
between arrivals on the same objects.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np

from dilaserve.replay.records import RequestRecord, Status
from dilaserve.replay.trace import Trace
from dilaserve.serving.admission import SLOTargets
from dilaserve.sim.config import ClusterConfig, SimPolicies
from dilaserve.sim.fast_cluster import FastCluster
from dilaserve.sim.ingress import NO_TARGETS, SimIngress
from dilaserve.sim.step_replica import StepCluster
from dilaserve.sim.workload import Workload

PROGRESS_EVERY = 1000  # arrivals between progress reports

log = logging.getLogger(__name__)


class Replay:
    """An open-loop replay in progress: the simulated ingress in front of the simulated
    replicas (``engines``: a ``StepCluster`` or a ``FastCluster``), fed one arrival at a time."""

    def __init__(self, workload: Workload, cluster: ClusterConfig, policies: SimPolicies):
        if policies.fidelity == "fast" and any(g.engine.load_control for g in cluster.groups):
            log.warning("fast fidelity does not model load control (threshold lowering); use --fidelity step")
        self.workload, self.cluster, self.policies = workload, cluster, policies
        self.names = [name for name, _ in cluster.replicas()]
        self.ingress = SimIngress(self.names, policies.routing, policies.admission, policies.slo)
        make_cluster = StepCluster if policies.fidelity == "step" else FastCluster
        self.engines = make_cluster(cluster, policies, workload, self.ingress.released)
        n = len(workload)
        self.replica_of = [-1] * n  # -1: refused or failed
        self.budget_s = [0.0] * n
        self.retry_after_s: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.num_arrived = 0
        self._arrivals, self._prompts, self._outputs = (
            a.tolist() for a in (workload.arrival_s, workload.prompt_tokens, workload.output_tokens))

    @property
    def next_arrival_s(self) -> float:
        """When the next request arrives (inf: none left)."""
        return self._arrivals[self.num_arrived] if self.num_arrived < len(self._arrivals) else math.inf

    def arrive(self) -> None:
        """The next request of the trace arrives: the cluster runs up to it, the ingress sets
        its deadline, admits or refuses it, and routes it."""
        i = self.num_arrived
        self.num_arrived += 1
        now = self._arrivals[i]
        engines, ingress = self.engines, self.ingress
        engines.advance(now)
        baseline = self.policies.baseline
        targets = NO_TARGETS if baseline is None else SLOTargets(
            self.policies.slo.slo_scale * baseline(self._prompts[i], self._outputs[i]))
        dispatch = ingress.dispatch(engines.estimates(now, i), self._outputs[i], 0.0, targets)
        self.budget_s[i] = dispatch.budget_s
        if dispatch.replica < 0:
            self.retry_after_s[i] = dispatch.retry_after_s
            return
        error = engines.submit(now, dispatch.replica, i, now + dispatch.budget_s)
        if error is not None:
            self.errors[i] = error
            return
        ingress.sent(dispatch.replica)
        self.replica_of[i] = dispatch.replica

    def finish(self) -> None:
        """Runs the cluster until every admitted request has finished."""
        if self.num_arrived < len(self._arrivals):
            raise RuntimeError(f"{len(self._arrivals) - self.num_arrived} requests have not arrived yet")
        self.engines.advance(math.inf)
        if any(self.ingress.in_flight):
            raise RuntimeError(f"the simulation ended with requests in flight: {sum(self.ingress.in_flight)}")

    def records(self, threshold_of: Sequence[float | None]) -> list[RequestRecord]:
        """One record per request, in trace order; ``threshold_of[i]``: the threshold request
        ``i`` ran at (None for those that did not run)."""
        return _records(self.workload, self.cluster.overhead_s, self.policies.system, self.replica_of, self.budget_s,
                        self.retry_after_s, self.errors, self.engines.first_token_s, self.engines.finish_s,
                        threshold_of)


def simulate(trace: Trace | Workload, cluster: ClusterConfig, policies: SimPolicies = SimPolicies(),
             progress: Callable[[int], None] | None = None) -> list[RequestRecord]:
    """Replays ``trace`` open-loop on the simulated ``cluster``; one record per request, in
    trace order, with times in seconds of the trace's clock. ``progress`` hears the number of
    arrivals handled, every ``PROGRESS_EVERY`` and at the end."""
    workload = trace if isinstance(trace, Workload) else Workload.from_trace(trace)
    replay = Replay(workload, cluster, policies)
    for i in range(1, len(workload) + 1):
        replay.arrive()
        if progress is not None and (i % PROGRESS_EVERY == 0 or i == len(workload)):
            progress(i)
    replay.finish()
    thresholds = [_threshold(group, policies) for _, group in cluster.replicas()]
    return replay.records([thresholds[r] if r >= 0 else None for r in replay.replica_of])


def _threshold(group, policies: SimPolicies) -> float:
    floor = policies.slo.quality_floor
    return group.default_threshold if floor is None else max(group.default_threshold, floor)


def _records(workload: Workload, overhead_s: float, system: str, replica_of: list[int], budget_s: list[float],
             retry_after_s: dict[int, int], errors: dict[int, str], first_token_s: np.ndarray,
             finish_s: np.ndarray, threshold_of: Sequence[float | None]) -> list[RequestRecord]:
    arrivals, prompts, outputs = (a.tolist() for a in (workload.arrival_s, workload.prompt_tokens,
                                                       workload.output_tokens))
    firsts, finishes = (first_token_s + overhead_s).tolist(), (finish_s + overhead_s).tolist()
    records = []
    for i, replica in enumerate(replica_of):
        arrival = arrivals[i]
        if replica >= 0:
            record = RequestRecord(i, arrival, arrival, firsts[i], finishes[i], prompts[i], outputs[i], outputs[i],
                                   Status.OK, system, 200, budget_s[i], None, None, threshold_of[i])
        elif i in errors:
            record = RequestRecord(i, arrival, arrival, None, arrival, prompts[i], outputs[i], 0, Status.ERROR, system,
                                   400, budget_s[i], error=errors[i])
        else:
            record = RequestRecord(i, arrival, arrival, None, arrival, prompts[i], outputs[i], 0, Status.REFUSED,
                                   system, 429, budget_s[i], float(retry_after_s[i]))
        records.append(record)
    return records
