"""How many requests per second one instance of degree ``p`` at setting (threshold ``t``,
sparse-KV retention ``r``) serves within SLO.

Derivation (docs/planner.md has the long form). Price one representative request of
``prompt + output`` tokens with the engine's cost model: ``request_work`` walks its blocks
at the threshold's tokens decided per step. Under continuous batching with ``b`` requests
in flight, each lasts ``L(b) = batch_work_s(cost, [work] * b)`` =
``fixed_s * steps + b * (per_token_s * tokens + per_context_s * context)``: the per-step fixed
cost is shared, token and attention work add up. By Little's law an instance that keeps
``b`` in flight completes ``b / L(b)`` requests per second. That rises with ``b``
(``b / (A + b B)``), so the best admissible ``b`` is the largest with ``L(b) <= deadline``,
at most ``max_running`` and at most the KV pages (``b * kv_tokens <= kv_capacity_tokens``).
Capacity is ``utilization * b / L(b)``; the utilization below 1 leaves room for bursts of
random arrivals. If even ``L(1)`` misses the deadline the capacity is 0.

Sparse KV (``r`` not None) is priced by the same cost model: a reuse step reads the block
and ``r`` of the positions outside it instead of the whole cached sequence, at the tokens
decided per step the quality profile measured with it. That saves attention reads only, so
it raises capacity where reuse steps read long contexts and barely (or, with its lower tokens
per step, not at all) at short ones. Sparse settings need the dual cache; with a latency
profile of another cache mode they are left out.

The deadline is ``slo_scale`` times the representative request's latency alone at the
reference setting: the smallest degree (1 where profiled) at the most accurate dense
threshold (so offering sparse settings never moves the deadline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dilaserve.engine.cost_model import Work, batch_work_s, request_work, work_s
from dilaserve.planner.profiles import DegreeProfile, ProfileSet, QualityEntry
from dilaserve.planner.workload import Workload

_DEADLINE_SLACK = 1e-9  # relative: the reference setting alone meets a slo_scale of 1 exactly


@dataclass(frozen=True)
class GroupCapacity:
    """What one instance of ``degree`` GPUs at ``threshold`` can do for the representative request."""

    degree: int
    threshold: float
    accuracy: float
    tokens_per_step: float
    solo_latency_s: float  # the request alone on an idle instance
    max_batch: int  # requests in flight that still meet the deadline (0: not even one)
    batch_latency_s: float  # each request's latency with max_batch in flight (solo when 0)
    capacity_rps: float  # requests per second one instance serves within the deadline
    limited_by: str  # what stops a larger batch: deadline, max_running, kv_capacity
    kv_retention: float | None = None  # sparse KV's retention; None: dense

    @property
    def key(self) -> tuple[int, float, float | None]:
        """(degree, threshold, kv_retention): one kind of instance."""
        return (self.degree, self.threshold, self.kv_retention)

    @property
    def capacity_per_gpu_rps(self) -> float:
        return self.capacity_rps / self.degree


@dataclass(frozen=True)
class CapacityTable:
    deadline_s: float
    reference_degree: int
    reference_threshold: float
    reference_latency_s: float  # solo latency at the reference setting (deadline / slo_scale)
    groups: tuple[GroupCapacity, ...]  # degree ascending, then as QualityProfile.settings

    def get(self, degree: int, threshold: float, kv_retention: float | None = None) -> GroupCapacity | None:
        return next((g for g in self.groups if g.key == (degree, threshold, kv_retention)), None)


def plannable_settings(profiles: ProfileSet) -> tuple[QualityEntry, ...]:
    """The quality profile's settings the latency profile can price: sparse ones only with the
    dual cache."""
    settings = profiles.quality.settings()
    if profiles.latency.cache == "dual":
        return settings
    return tuple(e for e in settings if e.kv_retention is None)


def best_setting(profiles: ProfileSet) -> QualityEntry:
    """The most accurate dense threshold (the higher threshold on a tie); the most accurate
    setting of all when the profile holds no dense one."""
    settings = plannable_settings(profiles)
    dense = [e for e in settings if e.kv_retention is None]
    return max(dense or settings, key=lambda e: (e.accuracy, e.threshold, -(e.kv_retention or 0.0)))


def _work(profiles: ProfileSet, workload: Workload, entry: QualityEntry) -> Work:
    seq_len = workload.prompt_tokens + workload.output_tokens
    return request_work(seq_len, workload.output_tokens, profiles.quality.block_size, entry.tokens_per_step,
                        profiles.latency.cache, entry.kv_retention)


def kv_tokens(seq_len: int, kv_retention: float | None) -> int:
    """KV-cache slots one request holds: its sequence, and with sparse KV its sparse region
    (``ceil(r * seq_len)``, as the engine's ``Request.kv_tokens`` without sparse scratch, the
    default; with scratch the prompt's pages are freed, which this does not count)."""
    return seq_len + (math.ceil(kv_retention * seq_len) if kv_retention is not None else 0)


def group_capacity(degree: DegreeProfile, entry: QualityEntry, work: Work, seq_len: int, deadline_s: float,
                   utilization: float) -> GroupCapacity:
    """The capacity of one instance (see the module docstring for the derivation)."""
    limit = deadline_s * (1 + _DEADLINE_SLACK)
    solo = work_s(degree.cost, work)
    by_kv = degree.kv_capacity_tokens // max(kv_tokens(seq_len, entry.kv_retention), 1)
    upper = min(degree.max_running, by_kv)
    bound = "kv_capacity" if by_kv < degree.max_running else "max_running"

    def latency(b: int) -> float:
        return batch_work_s(degree.cost, [work] * b)

    if upper < 1 or solo > limit:
        return GroupCapacity(degree.degree, entry.threshold, entry.accuracy, entry.tokens_per_step, solo, 0, solo, 0.0,
                             "kv_capacity" if upper < 1 else "deadline", entry.kv_retention)
    if latency(upper) <= limit:
        best = upper
    else:  # L(b) rises with b: the largest b within the deadline, by bisection
        bound = "deadline"
        low, high = 1, upper  # latency(low) meets the deadline, latency(high) misses it
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if latency(mid) <= limit else (low, mid)
        best = low
    batch_s = latency(best)
    return GroupCapacity(degree.degree, entry.threshold, entry.accuracy, entry.tokens_per_step, solo, best, batch_s,
                         utilization * best / batch_s, bound, entry.kv_retention)


def capacity_table(profiles: ProfileSet, workload: Workload, slo_scale: float, utilization: float = 0.9) -> CapacityTable:
    """Capacities of every (degree, threshold, kv_retention) the profiles hold, under ``slo_scale``."""
    settings = plannable_settings(profiles)
    reference = best_setting(profiles)
    reference_degree = profiles.latency.degrees[0]
    seq_len = workload.prompt_tokens + workload.output_tokens
    reference_s = work_s(reference_degree.cost, _work(profiles, workload, reference))
    deadline = slo_scale * reference_s
    works = {e.setting: _work(profiles, workload, e) for e in settings}
    groups = tuple(group_capacity(d, e, works[e.setting], seq_len, deadline, utilization)
                   for d in profiles.latency.degrees for e in settings)
    return CapacityTable(deadline, reference_degree.degree, reference.threshold, reference_s, groups)
