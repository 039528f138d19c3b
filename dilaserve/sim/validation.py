"""Simulated against real: the same metrics of two record sets, and whether they agree.

A validation run replays one trace twice, once against a real deployment (``dilaserve
replay``) and once through ``simulate`` configured like it (same replicas and engine limits,
the replicas' fitted ``StepCost``, the model's quality profile as the ``AcceptanceModel``,
``SLOConfig.overhead_ms`` as the cluster's ``overhead_s``, and the replay's idle-latency
``baseline`` so deadlines are the client's), then calls ``compare``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dilaserve.replay.metrics import ReplayMetrics, compute_metrics
from dilaserve.replay.records import RequestRecord


@dataclass(frozen=True)
class Tolerance:
    attainment: float = 0.05  # absolute (0.05: five percentage points)
    latency: float = 0.15  # relative, for TTFT and end-to-end p50 / p90
    tail_latency: float = 0.25  # relative, for p99
    p90_latency: float | None = None  # relative, for p90 when it differs from ``latency``


@dataclass(frozen=True)
class Comparison:
    real: ReplayMetrics
    simulated: ReplayMetrics
    differences: dict[str, float]  # "attainment": absolute; latencies: relative to the real run
    violations: tuple[str, ...]  # what falls outside the tolerance

    @property
    def is_within(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"{name}: {value:+.3f}" for name, value in self.differences.items()]
        return "\n".join(lines + [f"outside tolerance: {', '.join(self.violations) or 'nothing'}"])


def compare(real: Sequence[RequestRecord], simulated: Sequence[RequestRecord],
            tolerance: Tolerance = Tolerance()) -> Comparison:
    r, s = compute_metrics(real), compute_metrics(simulated)
    differences = {"attainment": s.slo_attainment - r.slo_attainment}
    violations = [] if abs(differences["attainment"]) <= tolerance.attainment else ["attainment"]
    for kind in ("ttft_s", "e2e_s"):
        real_summary, sim_summary = getattr(r, kind), getattr(s, kind)
        if real_summary is None or sim_summary is None:
            continue
        for q in ("p50", "p90", "p99"):
            name = f"{kind[:-2]} {q}"
            base = getattr(real_summary, q)
            differences[name] = (getattr(sim_summary, q) - base) / base if base > 0 else 0.0
            limit = tolerance.latency
            if q == "p99":
                limit = tolerance.tail_latency
            elif q == "p90" and tolerance.p90_latency is not None:
                limit = tolerance.p90_latency
            if abs(differences[name]) > limit:
                violations.append(name)
    return Comparison(r, s, differences, tuple(violations))
