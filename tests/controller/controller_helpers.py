"""Builders and fakes for the controller's pure tests: small profiles, a fake clock, and a
fake cluster that enforces the rules a real one must never see broken (no replica stopped
with requests in flight, no request routed to a draining replica)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.decision import Planning
from dilaserve.controller.observation import (
    FAILED, MISSING, READY, STARTING, ClusterView, LoadSnapshot, Observation, ReplicaView,
)
from dilaserve.planner import ProfileSet
from dilaserve.planner.profiles import latency_profile_from_dict, quality_profile_from_dict
from dilaserve.serving.config import ServeConfig, parse_config

# One degree-1 instance at t=0.9 serves ~1.1 req/s of 20+32-token requests within 3x their solo
# latency; at t=0.7 ~2 req/s (0.5 points less accurate); t=0.5 is outside a 1-point budget.
LATENCY = {"cache": "dual", "degrees": [
    {"degree": 1, "fixed_s": 0.3, "per_token_s": 1.5e-3, "per_context_s": 1e-6, "max_running": 16,
     "kv_capacity_tokens": 100000},
    {"degree": 2, "fixed_s": 0.18, "per_token_s": 0.9e-3, "per_context_s": 6e-7, "max_running": 16,
     "kv_capacity_tokens": 200000}]}
QUALITY = {"block_size": 16, "entries": [
    {"threshold": 0.9, "accuracy": 0.80, "tokens_per_step": 2.0},
    {"threshold": 0.7, "accuracy": 0.795, "tokens_per_step": 4.0},
    {"threshold": 0.5, "accuracy": 0.70, "tokens_per_step": 6.0}]}
LENGTHS = ((20, 32),) * 8
VARIANTS = {1: "cpu", 2: "tp2"}


def make_profiles() -> ProfileSet:
    return ProfileSet(latency_profile_from_dict(LATENCY), quality_profile_from_dict(QUALITY), "test")


def make_planning(gpus: int = 2, slo_scale: float = 3.0, quality_budget: float = 1.0) -> Planning:
    return Planning(make_profiles(), gpus=gpus, slo_scale=slo_scale, quality_budget=quality_budget)


def make_config(**overrides) -> ControllerConfig:
    fields = dict(gpus=2, tick_s=1.0, window_s=10.0, period_s=30.0, rate_change=0.25, min_interval_s=20.0,
                  headroom=0.2, min_replicas=1, start_timeout_s=30.0, drain_timeout_s=10.0)
    return ControllerConfig(**{**fields, **overrides})


def replica(name: str, threshold: float | None = 0.9, degree: int = 1, **kwargs) -> ReplicaView:
    fields = dict(variant=VARIANTS[degree], app_status=READY, is_routed=True)
    return ReplicaView(name, degree=degree, threshold=threshold, **{**fields, **kwargs})


def view(*replicas: ReplicaView) -> ClusterView:
    return ClusterView(tuple(replicas))


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeReplica:
    variant: str
    degree: int
    threshold: float
    status: str = READY
    is_routed: bool = True
    is_draining: bool = False
    is_removable: bool = True
    num_in_flight: int = 0
    polls_to_ready: int = 0
    kv_retention: float | None = None


@dataclass
class FakeCluster:
    """Replicas, an ingress with counters, and a log of every call in order."""

    clock: FakeClock
    replicas: dict[str, FakeReplica] = field(default_factory=dict)
    offered: float = 0.0
    arrivals: int = 0
    finished: int = 0
    met: int = 0
    epoch: str = "e1"
    lengths: tuple = LENGTHS
    fail_to_start: set = field(default_factory=set)
    polls_to_ready: int = 2  # replica_status polls before a new replica is ready
    requests_finish_per_poll: int = 1  # in-flight requests that end per is_drained poll
    calls: list = field(default_factory=list)
    serving_counts: list = field(default_factory=list)  # replicas taking requests, after every call

    def add(self, name: str, threshold: float = 0.9, degree: int = 1, **kwargs) -> None:
        self.replicas[name] = FakeReplica({1: "cpu", 2: "tp2"}[degree], degree, threshold, **kwargs)

    def serving(self) -> list[str]:
        return [n for n, r in self.replicas.items() if r.is_routed and not r.is_draining and r.status == READY]

    def _log(self, *call) -> None:
        self.calls.append(call)
        self.serving_counts.append(len(self.serving()))

    # -- traffic --
    def offer(self, rate_rps: float, seconds: float) -> None:
        """Arrivals at ``rate_rps`` for ``seconds``, all met, as the clock advances."""
        self.offered += rate_rps * seconds
        self.arrivals = self.finished = self.met = int(self.offered)

    # -- ObservableCluster --
    def observe(self, now_s: float) -> Observation:
        views = tuple(ReplicaView(
            n, r.variant, r.degree, r.threshold, r.status, r.is_routed, r.is_draining, r.is_removable,
            r.num_in_flight, r.num_in_flight, kv_retention=r.kv_retention) for n, r in sorted(self.replicas.items()))
        load = LoadSnapshot(now_s, self.epoch, self.arrivals, 0, self.finished, self.met, self.lengths)
        return Observation(now_s, ClusterView(views), load)

    def start_replica(self, name, variant, threshold, kv_retention=None) -> None:
        assert name not in self.replicas, f"{name} started twice"
        degree = {v: d for d, v in VARIANTS.items()}[variant]
        status = FAILED if name in self.fail_to_start else STARTING
        self.replicas[name] = FakeReplica(variant, degree, threshold, status, is_routed=False,
                                          polls_to_ready=self.polls_to_ready, kv_retention=kv_retention)
        self._log("start", name, threshold, *([kv_retention] if kv_retention is not None else []))

    def replica_status(self, names):
        out = {}
        for n in names:
            r = self.replicas.get(n)
            if r is None:
                out[n] = MISSING
                continue
            if r.status == STARTING:
                r.polls_to_ready -= 1
                if r.polls_to_ready <= 0:
                    r.status = READY
            out[n] = r.status
        return out

    def route(self, name) -> None:
        r = self.replicas[name]
        assert r.status == READY, f"{name} routed before it was ready"
        r.is_routed = True
        self._log("route", name)

    def unroute(self, name) -> None:
        r = self.replicas[name]
        assert r.num_in_flight == 0
        r.is_routed = False
        self._log("unroute", name)

    def set_policy(self, name, threshold, kv_retention=None) -> None:
        assert self.replicas[name].status == READY
        self.replicas[name].threshold = threshold
        self.replicas[name].kv_retention = kv_retention
        self._log("set_policy", name, threshold, kv_retention)

    def drain(self, name) -> None:
        self.replicas[name].is_draining = True
        self._log("drain", name)

    def is_drained(self, name) -> bool:
        r = self.replicas[name]
        r.num_in_flight = max(0, r.num_in_flight - self.requests_finish_per_poll)
        return r.num_in_flight == 0

    def stop_replica(self, name) -> None:
        r = self.replicas.get(name)
        if r is not None:
            assert r.num_in_flight == 0, f"{name} stopped with {r.num_in_flight} requests in flight (lost)"
            assert r.is_removable
            del self.replicas[name]
        self._log("stop", name)


# -- the real deployment of test_controller_serve.py (see conftest.py) ---------------------------
APP = "ctl"
MODEL = "tiny-ctl"
ROUTE = "/ctl"


def controlled_config(model_dir: str, port: int) -> ServeConfig:
    return parse_config({
        "app_name": APP,
        "models": [{"name": MODEL, "path": model_dir}],
        "variants": [{"name": "cpu", "model": MODEL, "num_replicas": 1, "num_cpus_per_replica": 0.2,
                      "threshold": 0.9, "engine": {"kv_memory_gib": 0.05}}],
        "http": {"host": "127.0.0.1", "port": port, "ingress_num_cpus": 0.05},
        "defaults": {"max_tokens": 32, "block_length": 16},
    }, "controller test config")


def write_profiles(directory: Path, latency: dict, quality: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latency.json").write_text(json.dumps(latency))
    (directory / "quality.json").write_text(json.dumps(quality))
    return str(directory)
