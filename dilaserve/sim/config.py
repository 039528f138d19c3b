"""What a simulation runs: the cluster (groups of identical replicas, each with its latency
profile) and the policies (routing, admission, SLOs, fidelity).

The cluster-level settings are the serving layer's own dataclasses (``RoutingConfig``,
``AdmissionConfig``, ``SLOConfig``, ``RequestDefaults``) and each replica's scheduler limits
are its ``EngineConfig``, so a simulated cluster and a served one are configured alike
(``ClusterConfig.from_serve_config`` builds one from a serving config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import StepCost
from dilaserve.replay.slo import BaselineLatency
from dilaserve.serving.config import AdmissionConfig, RequestDefaults, RoutingConfig, ServeConfig, SLOConfig
from dilaserve.sim.acceptance import AcceptanceModel

# KV pool of a replica whose EngineConfig leaves num_pages to be derived from the model's
# memory (which the simulator does not know): 4096 pages of 16 tokens = 65,536 tokens.
DEFAULT_NUM_PAGES = 4096
FIDELITIES = ("step", "fast")


@dataclass(frozen=True)
class ReplicaGroup:
    """``count`` identical replicas (one variant of a serving config).

    ``cost`` is the true step time of this hardware / model / parallelism: the simulated clock
    advances by it, and predictions use it (a profiled replica). ``threshold`` is the replicas'
    default confidence threshold (None: ``engine.default_threshold``).
    """

    name: str
    count: int = 1
    cost: StepCost = StepCost()
    engine: EngineConfig = EngineConfig()
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"group {self.name!r}: count must be >= 0, got {self.count}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"group {self.name!r}: threshold must be in (0, 1], got {self.threshold}")

    @property
    def num_pages(self) -> int:
        return self.engine.num_pages if self.engine.num_pages is not None else DEFAULT_NUM_PAGES

    @property
    def default_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.engine.default_threshold


@dataclass(frozen=True)
class ClusterConfig:
    groups: tuple[ReplicaGroup, ...]
    defaults: RequestDefaults = RequestDefaults()  # block size and cache mode of every request
    # Seconds per request spent outside the engine (HTTP, Serve hops, tokenization): added to
    # every simulated TTFT and end-to-end latency. What SLOConfig.overhead_ms predicts.
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.num_replicas < 1:
            raise ValueError("a cluster needs at least one replica")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique: {names}")

    @property
    def num_replicas(self) -> int:
        return sum(g.count for g in self.groups)

    def replicas(self) -> list[tuple[str, ReplicaGroup]]:
        """Every replica as ``(name, group)``; names as the serving layer gives them."""
        return [(f"{g.name}-{i}", g) for g in self.groups for i in range(g.count)]

    def with_threshold(self, threshold: float) -> ClusterConfig:
        return dataclasses.replace(self, groups=tuple(dataclasses.replace(g, threshold=threshold) for g in self.groups))

    @classmethod
    def homogeneous(cls, num_replicas: int, cost: StepCost = StepCost(), engine: EngineConfig = EngineConfig(),
                    threshold: float | None = None, **kwargs) -> ClusterConfig:
        return cls((ReplicaGroup("replica", num_replicas, cost, engine, threshold),), **kwargs)

    @classmethod
    def from_serve_config(cls, config: ServeConfig, costs: Mapping[str, StepCost], *, overhead_s: float | None = None,
                          num_pages: int | None = None) -> ClusterConfig:
        """The cluster a serving config describes; ``costs`` gives each variant's step cost
        (a variant without one gets ``StepCost()``, the engine's prior)."""
        groups = []
        for v in config.variants:
            engine = EngineConfig(**dict(v.engine))
            if engine.num_pages is None and num_pages is not None:
                engine = dataclasses.replace(engine, num_pages=num_pages)
            groups.append(ReplicaGroup(v.name, v.num_replicas, costs.get(v.name, StepCost()), engine, v.threshold))
        return cls(tuple(groups), config.defaults,
                   config.slo.overhead_ms / 1e3 if overhead_s is None else overhead_s)


@dataclass(frozen=True)
class SimPolicies:
    """How the simulated front door and replicas behave."""

    routing: RoutingConfig = RoutingConfig()
    admission: AdmissionConfig = AdmissionConfig()
    slo: SLOConfig = SLOConfig(overhead_ms=0.0)
    fidelity: str = "fast"  # "step": the real scheduler step by step; "fast": request-level events
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    # Deadlines as ``dilaserve replay`` sets them (slo_scale x this idle latency, sent with the
    # request); None: the ingress's own (slo_scale x the replicas' median predicted solo latency).
    baseline: BaselineLatency | None = None
    seed: int = 0  # acceptance draws (step fidelity)
    system: str = "sim"  # name written into every record

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}, got {self.fidelity!r}")
