"""The control loop, one tick at a time: observe -> decide -> apply. Pure logic.

``Controller.tick`` is what the Ray actor calls on its period; tests call it directly with a
fake cluster and a fake clock. The controller holds no request state: its memory is when it
last planned and reconfigured, and the last plan (for status). A new controller starts from
what it observes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from dilaserve.controller.actions import describe
from dilaserve.controller.apply import ApplyResult, Cluster, apply
from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.decision import ControllerState, Decision, Planning, decide
from dilaserve.controller.observation import LoadEstimate, LoadWindow, Observation

log = logging.getLogger(__name__)

HISTORY = 64  # recent ticks kept for status()
EVENTS = 256  # ticks that changed something (actions, a capacity correction), kept longer


class ObservableCluster(Cluster, Protocol):
    def observe(self, now_s: float) -> Observation: ...


@dataclass(frozen=True)
class TickRecord:
    time_s: float
    kind: str
    reason: str
    rate_rps: float | None
    attainment: float | None
    actions: tuple[str, ...]
    is_complete: bool | None  # None: nothing was applied
    error: str | None
    capacity_factor: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Controller:
    def __init__(self, config: ControllerConfig, cluster: ObservableCluster, planning: Planning,
                 variants: Mapping[int, str], *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = 0.5):
        self.config, self.cluster, self.planning, self.variants = config, cluster, planning, dict(variants)
        self.clock, self.sleep, self.poll_s = clock, sleep, poll_s
        self.state = ControllerState()
        self.window = LoadWindow(config.window_s)
        self.history: deque[TickRecord] = deque(maxlen=HISTORY)
        self.events: deque[TickRecord] = deque(maxlen=EVENTS)
        self.num_reconfigurations = 0
        self._lock = threading.Lock()  # status() may read while a tick runs in another thread

    def tick(self) -> Decision:
        now = self.clock()
        observation = self.cluster.observe(now)
        self.window.add(observation.load)
        load = self.window.estimate()
        decision = decide(now, observation.cluster, load, self.state, self.config, self.planning, self.variants)
        result: ApplyResult | None = None
        if decision.actions:
            log.info("%s: %s -> %s", decision.kind, decision.reason, [describe(a) for a in decision.actions])
            result = apply(decision.actions, self.cluster, start_timeout_s=self.config.start_timeout_s,
                           drain_timeout_s=self.config.drain_timeout_s, poll_s=self.poll_s, clock=self.clock,
                           sleep=self.sleep)
        elif decision.has_planned:
            log.info("%s: %s", decision.kind, decision.reason)
        self._remember(now, load, decision, result)
        return decision

    def _remember(self, now: float, load: LoadEstimate, decision: Decision, result: ApplyResult | None) -> None:
        with self._lock:
            s = self.state
            if load.lengths:
                s.last_lengths = load.lengths
            if decision.has_planned:
                s.last_plan_s, s.planned_rate_rps = now, decision.workload.rate_rps
            if decision.capacity_factor is not None:
                s.capacity_factor, s.last_correction_s = decision.capacity_factor, now
            if decision.kind == "reconfigure" and result is not None and result.is_complete:
                s.last_reconfig_s = self.clock()
                s.plan = decision.plan
                self.num_reconfigurations += 1
            record = TickRecord(
                now, decision.kind, decision.reason, load.rate_rps, load.attainment,
                tuple(describe(a) for a in decision.actions), None if result is None else result.is_complete,
                None if result is None else result.error, s.capacity_factor)
            self.history.append(record)
            if decision.actions or decision.capacity_factor is not None:
                self.events.append(record)

    def status(self) -> dict[str, Any]:
        with self._lock:
            s = self.state
            return {
                "num_reconfigurations": self.num_reconfigurations,
                "last_plan_s": s.last_plan_s, "planned_rate_rps": s.planned_rate_rps,
                "last_reconfig_s": s.last_reconfig_s, "capacity_factor": s.capacity_factor,
                "plan": s.plan.to_dict() if s.plan is not None else None,
                "history": [r.to_dict() for r in self.history],
                "events": [r.to_dict() for r in self.events],
            }
