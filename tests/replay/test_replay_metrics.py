"""Metrics on hand-made records, with the expected numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dilaserve.replay.metrics import compute_metrics, group_by_system, percentile
from dilaserve.replay.records import RequestRecord, Status, load_records, save_records


def rec(i, arrival, first, finish, received, status, deadline=1.0, correct=None, threshold=None, system="A"):
    return RequestRecord(request_id=i, arrival_s=arrival, send_s=arrival, first_token_s=first, finish_s=finish,
                         prompt_tokens=10, output_tokens_requested=8, output_tokens_received=received,
                         status=status, system=system, deadline_s=deadline, correct=correct, threshold_used=threshold)


RECORDS = [
    rec(0, 0.0, 0.2, 0.8, 4, Status.OK, correct=True, threshold=0.9),  # ttft .2 tpot .2 e2e .8: met
    rec(1, 1.0, 1.5, 3.0, 6, Status.OK, correct=False, threshold=0.7),  # ttft .5 tpot .3 e2e 2.0: late
    rec(2, 2.0, None, 2.01, 0, Status.REFUSED),
    rec(3, 3.0, None, 3.1, 0, Status.ERROR),
    rec(4, 4.0, 4.1, 4.5, 1, Status.OK, deadline=None),  # ttft .1 e2e .5, one token: no tpot; met
    rec(5, 5.0, 5.2, 10.0, 3, Status.TIMEOUT),
]


def test_percentile_interpolates_linearly():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([7], 99) == 7
    values = np.random.default_rng(0).exponential(size=101).tolist()
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_derived_fields_of_one_record():
    r = RECORDS[0]
    assert (r.ttft_s, r.e2e_s, r.tpot_s, r.slo_met) == (pytest.approx(0.2), 0.8, pytest.approx(0.2), True)
    assert RECORDS[1].slo_met is False and RECORDS[4].tpot_s is None and RECORDS[4].slo_met is True
    assert RECORDS[5].e2e_s is None and RECORDS[5].ttft_s == pytest.approx(0.2) and not RECORDS[5].slo_met


def test_metrics_arithmetic():
    m = compute_metrics(RECORDS)
    assert m.system == "A"
    assert (m.num_requests, m.num_ok, m.num_refused, m.num_errors, m.num_timeouts, m.num_slo_met) == (6, 3, 1, 1, 1, 2)
    assert m.slo_attainment == pytest.approx(2 / 6)
    assert m.refused_share == pytest.approx(1 / 6)
    assert m.duration_s == 10.0  # first arrival 0 to last finish 10
    assert m.offered_rps == pytest.approx(6 / 5)  # six arrivals over a span of 5 s
    assert m.throughput_rps == pytest.approx(0.3)
    assert m.goodput_rps == pytest.approx(0.2)
    assert m.goodput_tokens_per_s == pytest.approx((4 + 1) / 10)
    # TTFT of completed requests: .2, .5, .1 -> sorted .1 .2 .5
    assert (m.ttft_s.count, m.ttft_s.p50, m.ttft_s.p90, m.ttft_s.p99) == (
        3, pytest.approx(0.2), pytest.approx(0.44), pytest.approx(0.494))
    assert m.ttft_s.mean == pytest.approx(0.8 / 3)
    assert (m.tpot_s.p50, m.tpot_s.p90, m.tpot_s.p99) == (pytest.approx(0.25), pytest.approx(0.29), pytest.approx(0.299))
    assert (m.e2e_s.p50, m.e2e_s.p90, m.e2e_s.p99) == (pytest.approx(0.8), pytest.approx(1.76), pytest.approx(1.976))
    assert (m.num_scored, m.num_correct, m.accuracy) == (2, 1, 0.5)
    assert m.mean_threshold == pytest.approx(0.8)


def test_given_duration_and_empty_runs():
    assert compute_metrics(RECORDS, duration_s=20.0).goodput_rps == pytest.approx(0.1)
    empty = compute_metrics([], system="none")
    assert (empty.num_requests, empty.slo_attainment, empty.ttft_s, empty.accuracy) == (0, 0.0, None, None)
    all_refused = compute_metrics([RECORDS[2]])
    assert all_refused.slo_attainment == 0.0 and all_refused.e2e_s is None


def test_records_round_trip_through_jsonl(tmp_path):
    path = save_records(RECORDS, tmp_path / "sub" / "records.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and '"status": "refused"' in lines[2] and '"slo_met": true' in lines[0]
    assert load_records(path) == RECORDS


def test_group_by_system():
    mixed = [rec(0, 0, 0.1, 0.2, 1, Status.OK, system="B"), *RECORDS[:2]]
    groups = group_by_system(mixed)
    assert list(groups) == ["B", "A"] and len(groups["A"]) == 2
