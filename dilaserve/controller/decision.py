"""Observe -> decide -> an ordered list of actions. Pure logic (no Ray, no torch).

``decide`` is called every tick with what the controller sees and remembers:

1. **Reconcile** first: finish what a previous reconfiguration (or a previous life of the
   controller) left half done: route replicas that run but are not routed (a restarted
   ingress forgets live additions), finish removing draining replicas, delete replicas
   that failed to start, forget routed replicas whose application is gone. While anything
   is in transition, do not plan.
2. **Whether to plan**: on the period, when the rate moved by ``rate_change`` since the last
   plan, or when SLO attainment fell below its target.
3. **Plan** for the observed workload; a plan on fewer GPUs than running is re-planned at
   ``rate x (1 + headroom)`` so that a small dip does not shrink the cluster. When the
   running replicas miss the SLO that the profiles say they meet, capacities are scaled
   down before planning (``corrected_capacity``): the loop closes on measured attainment,
   not only on the model.
4. **Hysteresis**: compare with what the *running* replicas achieve at the same load
   (``planner.evaluate``) through ``planner.replan_reason``; and keep ``min_interval_s``
   between reconfigurations, except for one that serves ``min_gain`` more of the traffic
   (scaling up is never held back; flapping is stopped on the way down). A plan on fewer GPUs
   also waits until the load estimate spans a whole window (the first seconds of traffic are
   too few to give capacity back on), and is held while the running replicas miss the SLO
   target. With ``keep_gpus`` (a dedicated cluster) a plan on fewer GPUs than the budget is
   topped up with replicas of its most accurate setting first (``topped_up``).
5. **Diff** the running replicas against the plan's instances, each a (degree, threshold,
   sparse-KV retention): keep exact matches, push a new threshold and retention to a replica
   of the right degree (no restart), start what is missing, and remove the rest; in the order
   start -> wait ready -> route -> push policies -> drain -> wait drained -> stop.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from dilaserve.controller.actions import (
    Action, AwaitDrained, AwaitReady, DrainReplica, RouteReplica, SetPolicy, StartReplica, StopReplica,
    UnrouteReplica,
)
from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.observation import (
    FAILED, MISSING, READY, STARTING, ClusterView, LoadEstimate, ReplicaView, nearest_setting,
)
from dilaserve.planner import Plan, PlannerOptions, PlanResult, ProfileSet, Workload, evaluate, plan, replan_reason
from dilaserve.planner.capacity import best_setting, plannable_settings

# One kind of instance: (degree, threshold, kv_retention); kv_retention None is dense.
InstanceKey = tuple[int, float, float | None]

log = logging.getLogger(__name__)

_THRESHOLD_TOL = 1e-6
_MIN_RATE_MOVE_RPS = 0.05  # rate moves smaller than this never trigger a re-plan on their own


@dataclass(frozen=True)
class Planning:
    """The planner, bound to the profiles, GPU budget and SLO the controller plans with."""

    profiles: ProfileSet
    gpus: int
    slo_scale: float
    quality_budget: float
    options: PlannerOptions = PlannerOptions()

    @classmethod
    def for_degrees(cls, profiles: ProfileSet, degrees: Sequence[int], **kwargs) -> "Planning":
        """Only the degrees some variant can run (the planner must not pick one without a variant)."""
        kept = tuple(d for d in profiles.latency.degrees if d.degree in set(degrees))
        if not kept:
            raise ValueError(f"the latency profile has none of the variants' degrees {sorted(set(degrees))}")
        return cls(replace(profiles, latency=replace(profiles.latency, degrees=kept)), **kwargs)

    @property
    def thresholds(self) -> list[float]:
        return sorted({e.threshold for e in plannable_settings(self.profiles)})

    @property
    def settings(self) -> list[tuple[float, float | None]]:
        """Every (threshold, kv_retention) the planner may choose."""
        return [e.setting for e in plannable_settings(self.profiles)]

    @property
    def reference_threshold(self) -> float:
        """The most accurate dense threshold: what a warm replica without traffic runs (dense)."""
        return best_setting(self.profiles).threshold

    def scaled(self, capacity_factor: float, utilization: float) -> "Planning":
        """The same planning with every instance's capacity scaled by ``capacity_factor``."""
        return replace(self, options=replace(self.options, utilization=utilization * capacity_factor))

    def plan(self, workload: Workload) -> PlanResult:
        return plan(self.profiles, workload, self.gpus, self.slo_scale, self.quality_budget, self.options)

    def evaluate(self, instances: Sequence[tuple], workload: Workload) -> PlanResult:
        return evaluate(instances, self.profiles, workload, self.slo_scale, self.quality_budget, self.options)


@dataclass
class ControllerState:
    """What the controller remembers between ticks (nothing a restart cannot do without)."""

    last_plan_s: float | None = None  # when the planner last ran
    planned_rate_rps: float | None = None  # the rate it planned for
    last_reconfig_s: float | None = None  # when a reconfiguration last completed
    last_lengths: tuple[tuple[int, int], ...] = ()  # lengths to plan with while none are observed
    plan: Plan | None = None  # the plan last applied
    capacity_factor: float = 1.0  # how far the profiles' capacities are trusted (1: fully)
    last_correction_s: float | None = None  # when capacity_factor last changed


@dataclass(frozen=True)
class Decision:
    kind: str  # "reconcile", "wait", "idle", "hold", "reconfigure"
    reason: str
    actions: tuple[Action, ...] = ()
    has_planned: bool = False  # the planner ran this tick
    workload: Workload | None = None
    plan: Plan | None = None  # the plan these actions apply (reconfigure)
    # (degree, threshold, kv_retention, count) after the warm floor
    target: tuple[tuple[int, float, float | None, int], ...] = ()
    capacity_factor: float | None = None  # a corrected factor to remember (None: unchanged)
    plan_result: PlanResult | None = field(default=None, repr=False)


# -- 1. reconcile ------------------------------------------------------------------------------
def reconcile(cluster: ClusterView) -> tuple[list[Action], list[str]]:
    """Actions that finish half-done work, and what is still in transition (to wait for)."""
    actions: list[Action] = []
    pending: list[str] = []
    draining = []
    for r in cluster.replicas:
        if r.is_routed and r.app_status == MISSING:
            if r.num_in_flight == 0:
                actions.append(UnrouteReplica(r.name))
            else:
                pending.append(f"{r.name} is gone with {r.num_in_flight} requests in flight")
        elif r.is_draining:
            draining.append(r.name)
        elif not r.is_routed and r.app_status == READY:
            actions.append(RouteReplica(r.name))
        elif not r.is_routed and r.app_status == FAILED:
            actions.append(StopReplica(r.name))
        elif not r.is_routed and r.app_status == STARTING:
            pending.append(f"{r.name} is starting")
        elif r.is_routed and r.app_status in (STARTING, FAILED):  # Serve restarts unhealthy replicas
            pending.append(f"{r.name} does not answer")
    if draining:
        actions += [AwaitDrained(tuple(draining)), *(StopReplica(n) for n in draining)]
    return actions, pending


# -- 2. whether to plan ------------------------------------------------------------------------
def plan_trigger(now_s: float, load: LoadEstimate, state: ControllerState, config: ControllerConfig) -> str | None:
    if state.last_plan_s is None:
        return "first plan"
    if now_s - state.last_plan_s >= config.period_s:
        return f"period ({config.period_s:g} s)"
    rate, before = load.rate_rps, state.planned_rate_rps
    if rate is not None and before is not None:
        move = abs(rate - before)
        if move >= _MIN_RATE_MOVE_RPS and move >= config.rate_change * max(before, 1e-9):
            return f"rate moved {before:.3g} -> {rate:.3g} req/s"
    # Low attainment re-plans at most once per window: the window needs time to show a change.
    if (load.attainment is not None and load.attainment < config.attainment_target
            and now_s - state.last_plan_s >= config.window_s):
        return f"SLO attainment {100 * load.attainment:.1f}% < {100 * config.attainment_target:.0f}%"
    return None


# -- 3b. closing the loop on the model -----------------------------------------------------------
def corrected_capacity(now_s: float, load: LoadEstimate, state: ControllerState, config: ControllerConfig,
                       predicted_share: float | None) -> float:
    """The capacity factor to plan with: cut when the running replicas miss the SLO target
    although the profiles (at the current factor) predict they meet it; raised by 5% per
    window while the target is met. Judged only on a window that saw no reconfiguration and
    enough requests, at most once per window (additive-increase, multiplicative-decrease
    in spirit: the profiles say what the engine costs, not what HTTP, tokenization or a
    crowded host add)."""
    factor = state.capacity_factor
    if load.attainment is None or load.num_ended < config.min_window_requests:
        return factor
    for since in (state.last_reconfig_s, state.last_correction_s):
        if since is not None and now_s - since < config.window_s:
            return factor
    if load.attainment < config.attainment_target:
        if predicted_share is not None and predicted_share >= config.attainment_target:
            cut = max(0.5, load.attainment / config.attainment_target)
            return max(config.min_capacity_factor, factor * cut)
        return factor
    return min(1.0, factor * 1.05)


# -- 5. diff -----------------------------------------------------------------------------------
def next_names(variant: str, taken: set[str], count: int) -> list[str]:
    """``count`` new replica names ``<variant>-<k>``, after every index in use."""
    pattern = re.compile(rf"^{re.escape(variant)}-(\d+)$")
    used = [int(m.group(1)) for n in taken if (m := pattern.match(n))]
    start = max(used) + 1 if used else 0
    return [f"{variant}-{start + i}" for i in range(count)]


def _order(key: InstanceKey) -> tuple:
    """Degree ascending, threshold descending, dense before sparse, retention descending."""
    degree, threshold, retention = key
    return (degree, -threshold, retention is not None, -(retention or 0.0))


def _same_retention(a: float | None, b: float | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and abs(a - b) <= _THRESHOLD_TOL)


def diff(serving: Sequence[ReplicaView], target: Mapping[InstanceKey, int], variants: Mapping[int, str],
         taken: set[str]) -> list[Action]:
    """Actions that turn the ``serving`` replicas into ``target`` counts of (degree, threshold,
    kv_retention)."""
    want = Counter({k: n for k, n in target.items() if n > 0})
    # Replicas inside the main application cannot be removed: match them first.
    left = sorted(serving, key=lambda r: (r.is_removable, r.name))
    keep_exact = []
    for r in left:
        key = next((k for k in sorted(want, key=_order) if want[k] and k[0] == r.degree and r.threshold is not None
                    and abs(k[1] - r.threshold) <= _THRESHOLD_TOL and _same_retention(k[2], r.kv_retention)), None)
        if key is not None:
            want[key] -= 1
            keep_exact.append(r.name)
    left = [r for r in left if r.name not in keep_exact]
    pushes: list[Action] = []
    rest = []
    for r in left:  # a replica of the right degree only needs a new threshold and retention
        key = next((k for k in sorted(want, key=_order) if want[k] and k[0] == r.degree), None)
        if key is None:
            rest.append(r)
            continue
        want[key] -= 1
        pushes.append(SetPolicy(r.name, key[1], key[2]))
    starts: list[StartReplica] = []
    taken = set(taken)
    for (degree, threshold, retention), count in sorted(want.items(), key=lambda kv: _order(kv[0])):
        if count <= 0:
            continue
        names = next_names(variants[degree], taken, count)
        taken.update(names)
        starts += [StartReplica(n, variants[degree], threshold, retention) for n in names]
    removes = [r.name for r in rest if r.is_removable]
    for r in rest:
        if not r.is_removable:
            log.warning("replica %s is not in the plan but lives in the main application: it stays", r.name)
    actions: list[Action] = list(starts)
    if starts:
        actions += [AwaitReady(tuple(s.name for s in starts)), *(RouteReplica(s.name) for s in starts)]
    actions += pushes
    if removes:
        actions += [*(DrainReplica(n) for n in removes), AwaitDrained(tuple(removes)),
                    *(StopReplica(n) for n in removes)]
    return actions


def with_floor(instances: Sequence[tuple[int, float, float | None, int]], serving: Sequence[ReplicaView],
               min_replicas: int, planning: Planning) -> dict[InstanceKey, int]:
    """The plan's instances, topped up to ``min_replicas``: first with replicas already
    running (unchanged), then with the smallest degree at the most accurate threshold, dense."""
    target: Counter = Counter()
    for degree, threshold, retention, count in instances:
        target[(degree, threshold, retention)] += count
    missing = min_replicas - sum(target.values())
    for r in sorted(serving, key=lambda r: (r.is_removable, r.name)):
        if missing <= 0:
            break
        if r.threshold is not None:
            target[(r.degree, r.threshold, r.kv_retention)] += 1
            missing -= 1
    if missing > 0:
        smallest = min(d.degree for d in planning.profiles.latency.degrees)
        target[(smallest, planning.reference_threshold, None)] += missing
    return dict(target)


def topped_up(instances: Sequence[tuple[int, float, float | None, int]],
              gpus: int) -> tuple[tuple[int, float, float | None, int], ...]:
    """``instances`` plus replicas of their most accurate setting (highest threshold, as
    planned: dense or sparse) at their smallest degree, while they fit in ``gpus``."""
    counts: Counter = Counter()
    for d, t, r, n in instances:
        if n > 0:
            counts[(d, t, r)] += n
    if not counts:
        return tuple(instances)
    degree = min(d for d, _, _ in counts)
    threshold, retention = max(((t, r) for d, t, r in counts if d == degree), key=lambda s: (s[0], s[1] is None))
    spare = gpus - sum(d * n for (d, _, _), n in counts.items())
    if spare >= degree:
        counts[(degree, threshold, retention)] += spare // degree
    return tuple((*k, counts[k]) for k in sorted(counts, key=_order))


def running_instances(serving: Sequence[ReplicaView],
                      planning: Planning) -> tuple[tuple[int, float, float | None, int], ...]:
    """``(degree, threshold, kv_retention, count)`` of the serving replicas, each snapped to
    the profile's nearest setting (a replica whose threshold is unknown: the reference, dense)."""
    settings = planning.settings
    reference = (planning.reference_threshold, None)
    counts = Counter(
        (r.degree, *(nearest_setting(r.threshold, r.kv_retention, settings) if r.threshold is not None else reference))
        for r in serving)
    return tuple((*k, counts[k]) for k in sorted(counts, key=_order))


# -- all steps ---------------------------------------------------------------------------------
def decide(now_s: float, cluster: ClusterView, load: LoadEstimate, state: ControllerState,
           config: ControllerConfig, planning: Planning, variants: Mapping[int, str]) -> Decision:
    """What to do this tick (see the module docstring for the steps)."""
    actions, pending = reconcile(cluster)
    if actions:
        return Decision("reconcile", "finishing what is in transition", tuple(actions))
    if pending:
        return Decision("wait", "; ".join(pending))
    serving = cluster.serving()
    if len(serving) < config.min_replicas and not load.rate_rps:
        target = with_floor((), serving, config.min_replicas, planning)
        return Decision("reconfigure", f"fewer than {config.min_replicas} warm replicas",
                        tuple(diff(serving, target, variants, cluster.names())),
                        target=_target_rows(target))
    trigger = plan_trigger(now_s, load, state, config)
    if trigger is None:
        return Decision("idle", "no reason to re-plan")
    if load.rate_rps is None:
        return Decision("idle", "the arrival rate is not measured yet")
    lengths = load.lengths or state.last_lengths
    if not lengths:
        return Decision("idle", "no request lengths observed yet")
    workload = Workload.from_samples(load.rate_rps, lengths, config.length_statistic)
    running = running_instances(serving, planning)
    scaled = planning.scaled(state.capacity_factor, config.utilization)
    now_result = scaled.evaluate(running, workload) if running else None
    factor = corrected_capacity(now_s, load, state, config,
                                now_result.plan.served_share if now_result and now_result.plan else None)
    if factor != state.capacity_factor:
        trigger += f"; capacities scaled x{factor:.2f} (SLO attainment {100 * load.attainment:.1f}%)"
        scaled = planning.scaled(factor, config.utilization)
        now_result = scaled.evaluate(running, workload) if running else None
    result = scaled.plan(workload)
    decision = dict(has_planned=True, workload=workload, plan_result=result,
                    capacity_factor=factor if factor != state.capacity_factor else None)
    if result.plan is None:
        return Decision("hold", f"{trigger}: no plan ({result.status.value}: {result.message}); keeping the "
                        "running replicas", **decision)
    running_gpus = sum(d * n for d, *_, n in running)
    candidate = result
    if result.plan.gpus_used < running_gpus and config.headroom > 0:
        padded = scaled.plan(workload.with_rate(workload.rate_rps * (1 + config.headroom)))
        if padded.plan is not None:
            candidate = padded
    if config.keep_gpus and candidate.plan.gpus_used < config.gpus:
        kept = scaled.evaluate(topped_up(candidate.plan.instances, config.gpus), workload)
        if kept.plan is not None:
            candidate = kept
    if now_result is not None and now_result.plan is None:
        return Decision("hold", f"{trigger}: cannot evaluate the running replicas ({now_result.message})",
                        **decision)
    reason = replan_reason(now_result.plan if now_result else None, candidate.plan, config.min_gain,
                           min_gpus_freed=config.min_gpus_freed, min_accuracy_gain=config.min_accuracy_gain)
    if reason is None:
        return Decision("hold", f"{trigger}: the running replicas are good enough "
                        f"({_summary(now_result.plan if now_result else None)} vs {_summary(candidate.plan)})",
                        **decision)
    now_served = now_result.plan.served_share if now_result else 0.0
    serves_more = candidate.plan.served_share - now_served >= config.min_gain
    # Capacity is given back only on evidence: a whole window of load (a rate measured over the
    # first seconds of traffic, or after a restart, is too noisy), and not while the running
    # replicas miss the SLO target (the model that says fewer GPUs suffice is then wrong).
    # Scaling up never waits.
    if candidate.plan.gpus_used < running_gpus and not serves_more:
        why = None
        if load.span_s < config.window_s:
            why = f"the load is measured over {load.span_s:.0f} s only (< window {config.window_s:g} s)"
        elif load.attainment is not None and load.attainment < config.attainment_target:
            why = (f"the running replicas meet the SLO for {100 * load.attainment:.1f}% "
                   f"(< {100 * config.attainment_target:.0f}%)")
        if why is not None:
            return Decision("hold", f"{trigger}: would reconfigure ({reason}) onto {candidate.plan.gpus_used} of "
                            f"{running_gpus} GPUs, but {why}", **{**decision, "has_planned": False})
    # Serving more traffic is never held back; the interval guards the way down (and swaps).
    if (not serves_more and state.last_reconfig_s is not None
            and now_s - state.last_reconfig_s < config.min_interval_s):
        # Not recorded as planned: the same question comes back every tick until the interval ends.
        return Decision("hold", f"{trigger}: would reconfigure ({reason}) but the last reconfiguration was "
                        f"{now_s - state.last_reconfig_s:.0f} s ago (< {config.min_interval_s:g} s)",
                        **{**decision, "has_planned": False})
    target = with_floor(candidate.plan.instances, serving, config.min_replicas, planning)
    actions = diff(serving, target, variants, cluster.names())
    decision["target"] = _target_rows(target)
    if not actions:
        return Decision("hold", f"{trigger}: the plan matches the running replicas", **decision)
    return Decision("reconfigure", f"{trigger}: {reason}; {_summary(candidate.plan)}", tuple(actions),
                    plan=candidate.plan, **decision)


def _target_rows(target: Mapping[InstanceKey, int]) -> tuple[tuple[int, float, float | None, int], ...]:
    return tuple((*k, target[k]) for k in sorted(target, key=_order))


def _summary(p: Plan | None) -> str:
    if p is None:
        return "nothing running"
    groups = " + ".join(f"{n}x(p={d}, t={t:g}" + (f", kv={r:g})" if r is not None else ")")
                        for d, t, r, n in p.instances) or "no instance"
    return f"{groups}: {100 * p.served_share:.1f}% served on {p.gpus_used} GPUs, accuracy {100 * p.accuracy:.1f}%"
