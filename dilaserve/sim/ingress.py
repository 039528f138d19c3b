"""The simulated front door: deadline, admission and routing of each arriving request.

It follows ``serving.dispatcher.Dispatcher.dispatch`` step for step and calls the same code:
``admission.assign_deadline`` and ``admission.decide``, and the routing policy from
``router.make_router``. Replicas' predictions arrive as arrays (``Estimates``) rather than
one ``Estimate`` object per replica, and two reductions keep a decision over hundreds of
replicas cheap without changing it:

- ``decide`` depends only on the earliest predicted finish and the fastest solo latency, so it
  is given the predictions of those two replicas;
- ``SlackRouter`` picks among replicas whose slack is within ``tie_s`` of the best, so only
  those are turned into ``ReplicaLoad`` candidates (a policy without ``tie_s`` sees all).

``tests/sim/test_ingress.py`` checks both against passing every replica.

``set_routable`` narrows the replicas that take new requests (the controller's routed, ready,
not draining ones, as the ``Dispatcher`` routes only to those); by default all do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dilaserve.serving.admission import Prediction, SLODefaults, SLOTargets, assign_deadline, decide
from dilaserve.serving.config import AdmissionConfig, RoutingConfig, SLOConfig
from dilaserve.serving.router import ReplicaLoad, make_router

NO_TARGETS = SLOTargets()


@dataclass(frozen=True, slots=True)
class Estimates:
    """Every replica's predictions for one prospective request (seconds from now)."""

    finish_s: np.ndarray  # added now, queueing included
    solo_s: np.ndarray  # alone on the replica
    median_solo_s: float  # the median of ``solo_s`` (clusters know it cheaply)
    num_waiting: Sequence[int]


@dataclass(frozen=True, slots=True)
class Dispatch:
    replica: int  # index into the cluster's replicas; -1: refused
    budget_s: float  # end-to-end deadline, seconds from arrival
    retry_after_s: int = 0


class SimIngress:
    def __init__(self, names: Sequence[str], routing: RoutingConfig, admission: AdmissionConfig, slo: SLOConfig):
        self.names = list(names)
        self.admission = admission
        self.router = make_router(routing.policy, routing.seed)
        self.tie_s: float | None = getattr(self.router, "tie_s", None)
        self.slo_defaults = SLODefaults(
            slo.slo_scale, None if slo.ttft_ms is None else slo.ttft_ms / 1e3,
            None if slo.tpot_ms is None else slo.tpot_ms / 1e3,
        )
        self.overhead_s = slo.overhead_ms / 1e3
        # This ingress's count of requests sent to each replica and not finished (as the
        # Dispatcher keeps it), and the load snapshots of policies that need no predictions.
        self.in_flight = [0] * len(self.names)
        self._loads = [ReplicaLoad(name, None, 0) for name in self.names]
        self._index = {name: i for i, name in enumerate(self.names)}
        self._routable: np.ndarray | None = None  # indices that take new requests; None: all

    def set_routable(self, indices: Sequence[int] | None) -> None:
        """Only these replicas take new requests from now on (None: every replica)."""
        self._routable = None if indices is None else np.asarray(sorted(indices), dtype=np.int64)

    def sent(self, replica: int) -> None:
        self.in_flight[replica] += 1
        if not self.router.needs_predictions:
            self._loads[replica] = ReplicaLoad(self.names[replica], None, self.in_flight[replica])

    def released(self, replica: int) -> None:
        self.in_flight[replica] -= 1
        if not self.router.needs_predictions:
            self._loads[replica] = ReplicaLoad(self.names[replica], None, self.in_flight[replica])

    def dispatch(self, estimates: Estimates, num_output_tokens: int, elapsed_s: float = 0.0,
                 targets: SLOTargets = NO_TARGETS) -> Dispatch:
        """Deadline, admission and routing of one request, ``elapsed_s`` after its arrival."""
        overhead = self.overhead_s
        deadline = assign_deadline(targets, self.slo_defaults, estimates.median_solo_s + overhead, num_output_tokens)
        remaining_s = deadline.budget_s - elapsed_s
        finish, solo = estimates.finish_s, estimates.solo_s
        allowed = self._routable
        if self.admission.max_waiting is not None and self.admission.enabled:
            has_room = np.asarray(estimates.num_waiting) < self.admission.max_waiting
            allowed = np.flatnonzero(has_room) if allowed is None else allowed[has_room[allowed]]
        if allowed is not None:
            if not len(allowed):
                return Dispatch(-1, deadline.budget_s, 1)
            if len(allowed) < len(finish):
                finish = np.where(np.isin(np.arange(len(finish)), allowed), finish, np.inf)
            else:
                allowed = None
        best = int(finish.argmin())
        fastest = int(solo.argmin()) if allowed is None else int(allowed[solo[allowed].argmin()])
        predictions = [Prediction(float(finish[best]) + overhead, float(solo[best]) + overhead),
                       Prediction(float(finish[fastest]) + overhead, float(solo[fastest]) + overhead)]
        decision = decide(remaining_s, predictions, is_enabled=self.admission.enabled)
        if not decision.is_admitted:
            return Dispatch(-1, deadline.budget_s, decision.retry_after_s)
        return Dispatch(self._route(finish, best, allowed, remaining_s), deadline.budget_s)

    def _route(self, finish: np.ndarray, best: int, allowed: np.ndarray | None, remaining_s: float) -> int:
        if self.router.needs_predictions:
            if self.tie_s is None:
                indices = range(len(finish)) if allowed is None else allowed.tolist()
            else:  # a superset of the near-best set: the router itself applies tie_s exactly
                indices = np.flatnonzero(finish <= finish[best] + self.tie_s * (1 + 1e-9) + 1e-12).tolist()
            in_flight, names = self.in_flight, self.names
            candidates = [ReplicaLoad(names[r], float(finish[r]), in_flight[r]) for r in indices]
        elif allowed is None:
            candidates = self._loads
        else:
            candidates = [self._loads[r] for r in allowed.tolist()]
        return self._index[self.router.choose(candidates, remaining_s).name]
