"""The controller in the simulator: the same ``Controller`` the Ray actor runs, on simulated time.

``SimulatedCluster`` is the controller's ``ObservableCluster`` over a simulated replay
(``simulator.Replay``: the simulated ingress in front of ``StepCluster`` or ``FastCluster``
replicas, both fidelities). What it does, as ``ServeCluster`` does on Ray Serve:

- ``start_replica`` takes a free replica *slot* of the variant's group and sets its threshold;
  the replica is STARTING for ``startup_s`` simulated seconds (loading its model), then READY.
  Slots are made up front (the simulated clusters have a fixed replica list): each group of
  the ``ClusterConfig`` holds its initial replicas plus room for every instance a plan on
  ``gpus`` GPUs can run, twice (new instances come up before old ones go);
- ``route`` / ``drain`` / ``unroute`` change which replicas take new requests
  (``SimIngress.set_routable``); a draining replica finishes what it holds and takes nothing
  new; ``is_drained``: the ingress has nothing in flight there;
- ``set_policy``: requests admitted from then on take the new threshold; the simulated
  replicas do not model sparse KV, so a sparse retention is refused (plan with
  ``ProfileSet.without_sparse()``);
- ``stop_replica`` frees the slot, and refuses (recording a violation) while requests are in
  flight there, so a lost request cannot go unnoticed;
- ``observe`` reports the replicas and the ingress's counters as ``LoadCounters`` keeps them
  (arrivals, refusals, finished, finished within deadline, the last 256 finished requests'
  lengths), read from the replay's arrays at the simulated instant.

Time is the simulation's: ``clock`` is the simulated now, and ``sleep(s)`` *runs the
simulation* for ``s`` seconds (arrivals, steps, departures), so ``apply`` waiting for a replica
to load or to drain lets traffic flow meanwhile, as the actor's blocking waits do on a real
cluster. ``simulate_controlled`` ticks the controller every ``tick_s`` (after each tick, as
the actor does) until the trace has arrived, then lets the cluster finish.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.controller import Controller, TickRecord
from dilaserve.controller.decision import Planning
from dilaserve.controller.observation import (
    MISSING, READY, STARTING, ClusterView, LoadSnapshot, Observation, ReplicaView,
)
from dilaserve.replay.records import RequestRecord
from dilaserve.replay.trace import Trace
from dilaserve.serving.load_counters import MAX_LENGTH_SAMPLES
from dilaserve.sim.config import ClusterConfig, SimPolicies
from dilaserve.sim.simulator import Replay
from dilaserve.sim.workload import Workload

log = logging.getLogger(__name__)

EPOCH = "simulated-ingress"  # one ingress for the whole run: its counters never restart


@dataclass(frozen=True)
class ControlSetup:
    """What the simulated controller runs with: its settings, the planner bound to profiles,
    which group of the ``ClusterConfig`` is each degree's variant, and how long a new
    replica takes to start."""

    config: ControllerConfig
    planning: Planning
    variants: Mapping[int, str]  # parallelism degree -> group name (the variant)
    startup_s: float = 10.0  # simulated seconds from start_replica to READY
    poll_s: float = 0.5  # apply's wait between two looks at a starting or draining replica


@dataclass
class _Member:
    """A replica the controller knows of (started or initial), in a slot of the replay."""

    name: str
    variant: str
    degree: int
    slot: int
    threshold: float
    ready_s: float
    is_routed: bool = False
    is_draining: bool = False


@dataclass(frozen=True)
class MembershipPoint:
    time_s: float
    event: str  # "start", "route", "drain", "stop", "unroute", "threshold"
    name: str
    num_serving: int  # replicas taking new requests after the event
    gpus_serving: int
    gpus_live: int  # every started replica's GPUs (starting and draining included)


@dataclass
class ControlledRun:
    records: list[RequestRecord]
    ticks: list[TickRecord]  # every tick, in order
    membership: list[MembershipPoint]
    violations: list[str]  # broken rules (a stop with requests in flight, a route before ready): none expected
    num_reconfigurations: int
    status: dict = field(default_factory=dict)  # Controller.status() at the end


def expand_slots(cluster: ClusterConfig, variants: Mapping[int, str], gpus: int) -> ClusterConfig:
    """The cluster with room in each variant's group for ``2 x gpus // degree`` more replicas."""
    degree_of = {name: degree for degree, name in variants.items()}
    missing = set(degree_of) - {g.name for g in cluster.groups}
    if missing:
        raise ValueError(f"the cluster has no group for variant(s) {sorted(missing)}")
    groups = []
    for g in cluster.groups:
        if g.name not in degree_of:
            raise ValueError(f"group {g.name!r} is no variant of the controller ({dict(variants)})")
        groups.append(dataclasses.replace(g, count=g.count + 2 * max(1, gpus // degree_of[g.name])))
    return dataclasses.replace(cluster, groups=tuple(groups))


def _refuse_sparse(kv_retention: float | None) -> None:
    if kv_retention is not None:
        raise ValueError("the simulator does not model sparse KV; plan with ProfileSet.without_sparse()")


class SimulatedCluster:
    """The controller's ``ObservableCluster`` over a simulated replay (see the module docstring)."""

    def __init__(self, replay: Replay, initial: ClusterConfig, variants: Mapping[int, str], startup_s: float):
        self.replay = replay
        self.engines, self.ingress = replay.engines, replay.ingress
        self.startup_s = startup_s
        self.now = 0.0
        self.degree_of = {name: degree for degree, name in variants.items()}
        self.members: dict[str, _Member] = {}
        self.free_slots: dict[str, list[int]] = {g.name: [] for g in replay.cluster.groups}
        initial_counts = {g.name: g.count for g in initial.groups}
        slot = 0
        for g in replay.cluster.groups:
            for k in range(g.count):
                if k < initial_counts.get(g.name, 0):  # the initial replicas: up and routed
                    name = f"{g.name}-{k}"
                    self.members[name] = _Member(name, g.name, self.degree_of[g.name], slot, g.default_threshold,
                                                 0.0, is_routed=True)
                else:
                    self.free_slots[g.name].append(slot)
                slot += 1
        self.membership: list[MembershipPoint] = []
        self.violations: list[str] = []
        n = len(replay.workload)
        self._arrival_s = replay.workload.arrival_s
        self._budget_s = np.zeros(n)
        self._num_budgets = 0
        self._overhead_s = replay.cluster.overhead_s
        self._update_routing("initial", "")

    # -- time --------------------------------------------------------------------------------
    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(self, until_s: float) -> None:
        """Every arrival at or before ``until_s``, and everything the replicas do until then."""
        replay = self.replay
        while math.isfinite(replay.next_arrival_s) and replay.next_arrival_s <= until_s:
            replay.arrive()
        if math.isfinite(until_s):
            self.engines.advance(until_s)
            self.now = max(self.now, until_s)

    # -- reading -----------------------------------------------------------------------------
    def _status(self, member: _Member) -> str:
        return READY if self.now >= member.ready_s else STARTING

    def observe(self, now_s: float) -> Observation:
        in_flight = self.ingress.in_flight
        views = tuple(ReplicaView(
            m.name, m.variant, m.degree, m.threshold, self._status(m), is_routed=m.is_routed,
            is_draining=m.is_draining, num_in_flight=in_flight[m.slot], num_active=in_flight[m.slot])
            for m in sorted(self.members.values(), key=lambda m: m.name))
        return Observation(now_s, ClusterView(views), self._load(now_s))

    def _load(self, now_s: float) -> LoadSnapshot:
        """The ingress's counters at ``now_s``: a request is finished once its last byte has
        left (its finish plus the time outside the engine)."""
        replay = self.replay
        k = replay.num_arrived
        if k > self._num_budgets:
            self._budget_s[self._num_budgets:k] = replay.budget_s[self._num_budgets:k]
            self._num_budgets = k
        finish = self.engines.finish_s[:k] + self._overhead_s
        with np.errstate(invalid="ignore"):
            done = finish <= now_s
            met = done & (finish - self._arrival_s[:k] <= self._budget_s[:k])
        finished = np.flatnonzero(done)
        recent = finished[np.argsort(finish[finished], kind="stable")[-MAX_LENGTH_SAMPLES:]]
        workload = replay.workload
        lengths = tuple(zip(workload.prompt_tokens[recent].tolist(), workload.output_tokens[recent].tolist()))
        return LoadSnapshot(now_s, EPOCH, k, len(replay.retry_after_s), len(finished), int(met.sum()), lengths)

    def replica_status(self, names: Sequence[str]) -> dict[str, str]:
        return {n: self._status(self.members[n]) if n in self.members else MISSING for n in names}

    def is_drained(self, name: str) -> bool:
        member = self.members.get(name)
        return member is None or self.ingress.in_flight[member.slot] == 0

    # -- changing ----------------------------------------------------------------------------
    def start_replica(self, name: str, variant: str, threshold: float, kv_retention: float | None = None) -> None:
        _refuse_sparse(kv_retention)
        if name in self.members:
            raise ValueError(f"replica {name} exists already")
        free = self.free_slots.get(variant)
        if free is None:
            raise ValueError(f"unknown variant {variant!r}")
        if not free:
            raise RuntimeError(f"no free slot for another {variant} replica (see expand_slots)")
        slot = free.pop(0)
        self.engines.set_threshold(slot, threshold)
        self.members[name] = _Member(name, variant, self.degree_of[variant], slot, threshold,
                                     self.now + self.startup_s)
        self._update_routing("start", name)

    def route(self, name: str) -> None:
        member = self.members[name]
        if self._status(member) != READY:
            self.violations.append(f"t={self.now:.3f}: {name} routed before it was ready")
            raise RuntimeError(f"{name} is not ready")
        member.is_routed = True
        self._update_routing("route", name)

    def unroute(self, name: str) -> None:
        member = self.members[name]
        self._check_idle(member, "unrouted")
        member.is_routed = False
        self._update_routing("unroute", name)

    def set_policy(self, name: str, threshold: float, kv_retention: float | None = None) -> None:
        _refuse_sparse(kv_retention)
        member = self.members[name]
        self.engines.set_threshold(member.slot, threshold)
        member.threshold = threshold
        self._update_routing("threshold", name)

    def drain(self, name: str) -> None:
        self.members[name].is_draining = True
        self._update_routing("drain", name)

    def stop_replica(self, name: str) -> None:
        member = self.members.get(name)
        if member is None:
            return
        self._check_idle(member, "stopped")
        del self.members[name]
        self.free_slots[member.variant].append(member.slot)
        self._update_routing("stop", name)

    def _check_idle(self, member: _Member, what: str) -> None:
        in_flight = self.ingress.in_flight[member.slot]
        if in_flight:
            self.violations.append(f"t={self.now:.3f}: {member.name} {what} with {in_flight} requests in flight")
            raise RuntimeError(f"{member.name} has {in_flight} requests in flight")

    def _update_routing(self, event: str, name: str) -> None:
        serving = [m for m in self.members.values()
                   if m.is_routed and not m.is_draining and self._status(m) == READY]
        self.ingress.set_routable([m.slot for m in serving])
        self.membership.append(MembershipPoint(
            self.now, event, name, len(serving), sum(m.degree for m in serving),
            sum(m.degree for m in self.members.values())))


def simulate_controlled(trace: Trace | Workload, cluster: ClusterConfig, policies: SimPolicies,
                        control: ControlSetup, progress: Callable[[int], None] | None = None) -> ControlledRun:
    """Replays ``trace`` on ``cluster`` (its initial replicas) while the controller re-plans and
    reconfigures it on the simulated clock; records as ``simulate`` writes them, each with the
    threshold its request ran at."""
    workload = trace if isinstance(trace, Workload) else Workload.from_trace(trace)
    replay = Replay(workload, expand_slots(cluster, control.variants, control.config.gpus), policies)
    sim = SimulatedCluster(replay, cluster, control.variants, control.startup_s)
    controller = Controller(control.config, sim, control.planning, control.variants, clock=sim.clock,
                            sleep=sim.sleep, poll_s=control.poll_s)
    ticks: list[TickRecord] = []
    tick_s = control.config.tick_s
    while replay.num_arrived < len(workload):
        controller.tick()
        ticks.append(controller.history[-1])
        sim.run_until(sim.now + tick_s)
        if progress is not None:
            progress(replay.num_arrived)
    replay.finish()
    threshold_used = replay.engines.threshold_used.tolist()
    records = replay.records([threshold_used[i] if r >= 0 else None for i, r in enumerate(replay.replica_of)])
    return ControlledRun(records, ticks, sim.membership, sim.violations, controller.num_reconfigurations,
                         controller.status())
