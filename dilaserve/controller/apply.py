"""Running a decision's actions against a cluster, in order. Pure logic over the ``Cluster``
protocol (``serve_cluster.ServeCluster`` is the Ray Serve one; tests use a fake).

The rules that keep requests safe live here, not in each caller:
- the first action that fails stops the sequence, so old replicas are drained and removed
  only after every new one came up and is routed;
- replicas that do not come up in ``start_timeout_s`` (or fail) are deleted again;
- a drain that outlasts ``drain_timeout_s`` stops the sequence *without* removing anything:
  the replica stays draining and the next tick waits again (a request is never cut off).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from dilaserve.controller.actions import (
    Action, AwaitDrained, AwaitReady, DrainReplica, RouteReplica, SetPolicy, StartReplica, StopReplica,
    UnrouteReplica, describe,
)
from dilaserve.controller.observation import FAILED, READY

log = logging.getLogger(__name__)


class Cluster(Protocol):
    def start_replica(self, name: str, variant: str, threshold: float, kv_retention: float | None = None) -> None:
        """Begins deploying the replica (``kv_retention`` None: dense); returns without waiting for it."""

    def replica_status(self, names: Sequence[str]) -> dict[str, str]:
        """READY, STARTING or FAILED for each name."""

    def route(self, name: str) -> None: ...

    def unroute(self, name: str) -> None: ...

    def set_policy(self, name: str, threshold: float, kv_retention: float | None = None) -> None:
        """The replica's default threshold and sparse-KV retention (None: dense), live."""

    def drain(self, name: str) -> None: ...

    def is_drained(self, name: str) -> bool:
        """No request in flight at the ingress for it, none running or waiting in its engine."""

    def stop_replica(self, name: str) -> None:
        """Forgets it at the ingress (if routed) and deletes its Serve application."""


@dataclass
class ApplyResult:
    done: list[Action] = field(default_factory=list)
    stopped_at: Action | None = None  # the action the sequence stopped at (None: all ran)
    error: str | None = None

    @property
    def is_complete(self) -> bool:
        return self.stopped_at is None


def apply(actions: Sequence[Action], cluster: Cluster, *, start_timeout_s: float, drain_timeout_s: float,
          poll_s: float = 0.5, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> ApplyResult:
    result = ApplyResult()
    started: list[str] = []
    for action in actions:
        try:
            error = _run(action, cluster, started, start_timeout_s, drain_timeout_s, poll_s, clock, sleep)
        except Exception as exc:  # a cluster call failed: stop here, the next tick reconciles
            log.exception("%s failed", describe(action))
            error = f"{describe(action)} failed: {exc!r}"
        if error is not None:
            result.stopped_at, result.error = action, error
            log.warning("reconfiguration stopped: %s", error)
            return result
        result.done.append(action)
        log.info("done: %s", describe(action))
    return result


def _run(action: Action, cluster: Cluster, started: list[str], start_timeout_s: float, drain_timeout_s: float,
         poll_s: float, clock, sleep) -> str | None:
    """Runs one action; returns why the sequence must stop, or None."""
    if isinstance(action, StartReplica):
        started.append(action.name)
        cluster.start_replica(action.name, action.variant, action.threshold, action.kv_retention)
    elif isinstance(action, AwaitReady):
        end = clock() + start_timeout_s
        while True:
            status = cluster.replica_status(action.names)
            failed = [n for n in action.names if status.get(n) == FAILED]
            waiting = [n for n in action.names if status.get(n) != READY]
            if not failed and not waiting:
                return None
            if failed or clock() >= end:
                bad = failed or waiting
                for name in action.names:  # give back what was started for this plan
                    if name in started:
                        _stop_quietly(cluster, name)
                what = "failed to start" if failed else f"not ready after {start_timeout_s:g} s"
                return f"replica(s) {bad} {what}; the running replicas stay as they were"
            sleep(poll_s)
    elif isinstance(action, RouteReplica):
        cluster.route(action.name)
    elif isinstance(action, SetPolicy):
        cluster.set_policy(action.name, action.threshold, action.kv_retention)
    elif isinstance(action, DrainReplica):
        cluster.drain(action.name)
    elif isinstance(action, AwaitDrained):
        end = clock() + drain_timeout_s
        while True:
            busy = [n for n in action.names if not cluster.is_drained(n)]
            if not busy:
                return None
            if clock() >= end:
                return f"replica(s) {busy} still have requests after {drain_timeout_s:g} s; they stay draining"
            sleep(poll_s)
    elif isinstance(action, StopReplica):
        cluster.stop_replica(action.name)
    elif isinstance(action, UnrouteReplica):
        cluster.unroute(action.name)
    else:
        raise TypeError(f"unknown action {action!r}")
    return None


def _stop_quietly(cluster: Cluster, name: str) -> None:
    try:
        cluster.stop_replica(name)
    except Exception:
        log.exception("removing replica %s, which did not start, failed", name)
