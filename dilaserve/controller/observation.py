"""What the controller sees of the cluster, and the load over a sliding window. Pure logic.

A tick produces an ``Observation``: a ``ClusterView`` (every replica the ingress routes to or
that runs in a Serve application of its own) and a ``LoadSnapshot`` (the ingress's
cumulative counters). ``LoadWindow`` turns successive snapshots into an arrival rate and an
SLO attainment over the last ``window_s`` seconds; counters that restart (a new ingress)
restart the window, so the controller keeps no state that a restart of either side breaks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

READY, STARTING, FAILED, MISSING = "ready", "starting", "failed", "missing"


@dataclass(frozen=True)
class ReplicaView:
    name: str
    variant: str
    degree: int  # GPUs per instance (the variant's tensor parallel degree)
    threshold: float | None  # its default threshold (None: not known yet)
    app_status: str  # READY, STARTING or FAILED (its Serve application), MISSING (gone)
    is_routed: bool = False  # the ingress routes to it, or drains it
    is_draining: bool = False
    is_removable: bool = True  # in a Serve application of its own (False: inside the main one)
    num_in_flight: int = 0  # requests the ingress sent there and has not seen finish
    num_active: int = 0  # the engine's running + waiting requests (0 when unknown)
    app_name: str | None = None
    deployment_name: str | None = None
    kv_retention: float | None = None  # its sparse-KV retention for requests that leave it unset (None: dense)

    @property
    def is_serving(self) -> bool:
        """Takes new requests now."""
        return self.is_routed and not self.is_draining and self.app_status == READY

    @property
    def is_idle(self) -> bool:
        return self.num_in_flight == 0 and self.num_active == 0


@dataclass(frozen=True)
class ClusterView:
    replicas: tuple[ReplicaView, ...]

    def serving(self) -> list[ReplicaView]:
        return [r for r in self.replicas if r.is_serving]

    def names(self) -> set[str]:
        return {r.name for r in self.replicas}

    def get(self, name: str) -> ReplicaView | None:
        return next((r for r in self.replicas if r.name == name), None)


@dataclass(frozen=True)
class LoadSnapshot:
    """The ingress's counters (``dilaserve.serving.load_counters``) read at ``time_s``."""

    time_s: float  # the controller's clock
    epoch: str  # changes when the ingress restarts
    num_arrivals: int
    num_refused: int
    num_finished: int
    num_slo_met: int
    lengths: tuple[tuple[int, int], ...] = ()  # recent (prompt, completion) tokens

    @classmethod
    def from_report(cls, time_s: float, report: Mapping[str, Any]) -> "LoadSnapshot":
        return cls(time_s, str(report["epoch"]), int(report["num_arrivals"]), int(report["num_refused"]),
                   int(report["num_finished"]), int(report["num_slo_met"]),
                   tuple((int(p), int(o)) for p, o in report.get("lengths", ())))


@dataclass(frozen=True)
class Observation:
    time_s: float
    cluster: ClusterView
    load: LoadSnapshot


@dataclass(frozen=True)
class LoadEstimate:
    rate_rps: float | None  # arrivals per second over the window (None: not measured yet)
    attainment: float | None  # met / (finished + refused) over the window (None: nothing ended)
    lengths: tuple[tuple[int, int], ...]
    span_s: float  # seconds the estimate covers
    num_ended: int = 0  # requests finished or refused within the window


class LoadWindow:
    """Arrival rate and SLO attainment over the last ``window_s`` seconds of snapshots."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._points: deque[LoadSnapshot] = deque()

    def add(self, snapshot: LoadSnapshot) -> None:
        if self._points:
            last = self._points[-1]
            if snapshot.epoch != last.epoch or snapshot.num_arrivals < last.num_arrivals:
                self._points.clear()  # a new ingress: its counters start again
        self._points.append(snapshot)
        start = snapshot.time_s - self.window_s
        # Keep the newest point at or before the window's start as its base.
        while len(self._points) >= 2 and self._points[1].time_s <= start:
            self._points.popleft()

    def estimate(self) -> LoadEstimate:
        if not self._points:
            return LoadEstimate(None, None, (), 0.0)
        first, last = self._points[0], self._points[-1]
        span = last.time_s - first.time_s
        rate = (last.num_arrivals - first.num_arrivals) / span if span > 0 else None
        ended = (last.num_finished - first.num_finished) + (last.num_refused - first.num_refused)
        attainment = (last.num_slo_met - first.num_slo_met) / ended if ended > 0 else None
        return LoadEstimate(rate, attainment, last.lengths, span, ended)


def nearest(value: float | None, choices: Sequence[float]) -> float | None:
    """The choice closest to ``value`` (None when either is missing)."""
    if value is None or not choices:
        return None
    return min(choices, key=lambda c: (abs(c - value), -c))


def nearest_setting(threshold: float, kv_retention: float | None,
                    settings: Sequence[tuple[float, float | None]]) -> tuple[float, float | None] | None:
    """The (threshold, kv_retention) setting closest to a replica's: the same kind (dense or
    sparse) where there is one, then the nearest threshold, then the nearest retention."""
    if not settings:
        return None

    def distance(s: tuple[float, float | None]) -> tuple:
        t, r = s
        is_other_kind = (r is None) != (kv_retention is None)
        gap = abs(r - kv_retention) if r is not None and kv_retention is not None else 0.0
        return (is_other_kind, abs(t - threshold), gap, -t, r is not None, -(r or 0.0))

    return min(settings, key=distance)
