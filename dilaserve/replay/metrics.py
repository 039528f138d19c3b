"""Replay metrics from request records, by arithmetic a reader can check by hand.

- Every request in the records counts as sent: SLO attainment is ``met / all``, so refused,
  failed and timed-out requests count as misses.
- ``duration_s`` is the makespan, from the first arrival to the last finish (or arrival), unless
  the caller gives one. Goodput is what met its SLO per second of it: requests, and output
  tokens received.
- Latency percentiles are over completed requests, with linear interpolation between order
  statistics (numpy's default): for ``[1, 2, 3, 4]`` p50 is 2.5 and p90 is 3.7.
- Accuracy is over scored requests only (completed requests with a checkable answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from dilaserve.replay.records import RequestRecord, Status


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; ``values`` must be non-empty."""
    if not values:
        raise ValueError("percentile of no values")
    return _sorted_percentile(sorted(values), q)


def _sorted_percentile(ordered: Sequence[float], q: float) -> float:
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencySummary | None:
        if not values:
            return None
        ordered = sorted(values)
        return cls(len(ordered), sum(ordered) / len(ordered), _sorted_percentile(ordered, 50),
                   _sorted_percentile(ordered, 90), _sorted_percentile(ordered, 99))


@dataclass(frozen=True)
class ReplayMetrics:
    system: str
    num_requests: int
    num_ok: int
    num_refused: int
    num_errors: int
    num_timeouts: int
    num_slo_met: int
    slo_attainment: float  # num_slo_met / num_requests
    refused_share: float  # num_refused / num_requests
    duration_s: float
    offered_rps: float  # num_requests / arrival span (0 when the span is 0)
    throughput_rps: float  # num_ok / duration_s
    goodput_rps: float  # num_slo_met / duration_s
    goodput_tokens_per_s: float  # output tokens received by SLO-meeting requests / duration_s
    ttft_s: LatencySummary | None
    tpot_s: LatencySummary | None
    e2e_s: LatencySummary | None
    num_scored: int
    num_correct: int
    accuracy: float | None  # num_correct / num_scored
    mean_threshold: float | None  # over requests that reported one


def compute_metrics(records: Sequence[RequestRecord], *, duration_s: float | None = None,
                    system: str | None = None) -> ReplayMetrics:
    """Metrics of one run. ``system`` defaults to the records' own system name(s)."""
    if system is None:
        system = ", ".join(sorted({r.system for r in records}))
    n = len(records)
    by_status = dict.fromkeys(Status, 0)
    ttft, tpot, e2e, thresholds = [], [], [], []
    num_met = met_tokens = num_scored = num_correct = 0
    first_arrival = last_arrival = last_event = None
    for r in records:  # one pass: simulator runs hold millions of records
        by_status[r.status] += 1
        if first_arrival is None or r.arrival_s < first_arrival:
            first_arrival = r.arrival_s
        if last_arrival is None or r.arrival_s > last_arrival:
            last_arrival = r.arrival_s
        event = r.arrival_s if r.finish_s is None else max(r.arrival_s, r.finish_s)
        if last_event is None or event > last_event:
            last_event = event
        if r.status is Status.OK:
            if r.first_token_s is not None:
                ttft.append(r.first_token_s - r.arrival_s)
            if r.finish_s is not None:
                e2e.append(r.finish_s - r.arrival_s)
            if (per_token := r.tpot_s) is not None:
                tpot.append(per_token)
        if r.slo_met:
            num_met += 1
            met_tokens += r.output_tokens_received
        if r.correct is not None:
            num_scored += 1
            num_correct += bool(r.correct)
        if r.threshold_used is not None:
            thresholds.append(r.threshold_used)
    if duration_s is None:
        duration_s = last_event - first_arrival if n else 0.0
    span = last_arrival - first_arrival if n else 0.0

    def per_s(x: float) -> float:
        return x / duration_s if duration_s > 0 else 0.0

    return ReplayMetrics(
        system=system,
        num_requests=n,
        num_ok=by_status[Status.OK],
        num_refused=by_status[Status.REFUSED],
        num_errors=by_status[Status.ERROR],
        num_timeouts=by_status[Status.TIMEOUT],
        num_slo_met=num_met,
        slo_attainment=num_met / n if n else 0.0,
        refused_share=by_status[Status.REFUSED] / n if n else 0.0,
        duration_s=duration_s,
        offered_rps=n / span if span > 0 else 0.0,
        throughput_rps=per_s(by_status[Status.OK]),
        goodput_rps=per_s(num_met),
        goodput_tokens_per_s=per_s(met_tokens),
        ttft_s=LatencySummary.of(ttft),
        tpot_s=LatencySummary.of(tpot),
        e2e_s=LatencySummary.of(e2e),
        num_scored=num_scored,
        num_correct=num_correct,
        accuracy=num_correct / num_scored if num_scored else None,
        mean_threshold=sum(thresholds) / len(thresholds) if thresholds else None,
    )


def group_by_system(records: Sequence[RequestRecord]) -> dict[str, list[RequestRecord]]:
    """Records split by their ``system`` field, in order of first appearance."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.system, []).append(r)
    return groups
