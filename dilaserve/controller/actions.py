"""The steps a reconfiguration is made of, as plain data, in the order they run.

A decision is an ordered tuple of these; ``apply.apply`` runs them against a ``Cluster`` and
stops at the first that fails, so nothing is drained or removed unless every replica meant to
replace it came up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class StartReplica:
    """Deploy a new replica (its own Serve application); not routed yet."""

    name: str
    variant: str
    threshold: float
    kv_retention: float | None = None  # sparse KV for requests that leave it unset; None: dense


@dataclass(frozen=True)
class AwaitReady:
    """Wait until every named replica has loaded its model (failure: stop here)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class RouteReplica:
    """The ingress starts sending requests to it."""

    name: str


@dataclass(frozen=True)
class SetPolicy:
    """Push a new default threshold and sparse-KV retention (None: dense) to a live replica
    (``set_policy``; no restart)."""

    name: str
    threshold: float
    kv_retention: float | None = None


@dataclass(frozen=True)
class DrainReplica:
    """The ingress sends it no new requests; those in flight finish."""

    name: str


@dataclass(frozen=True)
class AwaitDrained:
    """Wait until the named replicas have no request in flight (timeout: stop here, retry later)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class StopReplica:
    """Forget a drained replica at the ingress and delete its Serve application."""

    name: str


@dataclass(frozen=True)
class UnrouteReplica:
    """Forget a routed replica whose application is gone (nothing in flight there)."""

    name: str


Action = Union[StartReplica, AwaitReady, RouteReplica, SetPolicy, DrainReplica, AwaitDrained, StopReplica,
               UnrouteReplica]


def describe(action: Action) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in vars(action).items())
    return f"{type(action).__name__}({fields})"
