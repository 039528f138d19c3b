"""Trace transformations: exact arithmetic on small hand-made traces."""

from __future__ import annotations

import pytest

from dilaserve.replay.trace import Trace, TraceRequest


def trace_of(*rows) -> Trace:
    return Trace(tuple(TraceRequest(*row) for row in rows))


def test_sorted_on_construction_and_facts():
    trace = trace_of((3.0, 1, 1), (0.0, 2, 2), (1.0, 3, 3))
    assert [r.arrival_s for r in trace] == [0.0, 1.0, 3.0]
    assert trace.span_s == 3.0 and trace.mean_rate_rps == 1.0
    assert len(trace[1:]) == 2 and trace[0].total_tokens == 4
    assert Trace(()).mean_rate_rps == 0.0


def test_rate_scaling_compresses_gaps_from_the_first_arrival():
    trace = trace_of((10.0, 1, 1), (11.0, 1, 1), (13.0, 1, 1))
    scaled = trace.scale_rate(2.0)
    assert [r.arrival_s for r in scaled] == [10.0, 10.5, 11.5]
    assert scaled.mean_rate_rps == pytest.approx(2 * trace.mean_rate_rps)
    assert [r.arrival_s for r in trace.scale_rate(0.5)] == [10.0, 12.0, 16.0]
    with pytest.raises(ValueError):
        trace.scale_rate(0)


def test_window_is_half_open_and_rebased():
    trace = trace_of((0.0, 1, 1), (5.0, 2, 1), (9.999, 3, 1), (10.0, 4, 1))
    window = trace.window(5.0, 5.0)
    assert [(r.arrival_s, r.prompt_tokens) for r in window] == [(0.0, 2), (pytest.approx(4.999), 3)]
    assert [r.arrival_s for r in trace.window(5.0, 5.0, rebase=False)] == [5.0, 9.999]
    assert len(trace.window(1.0)) == 3
    assert trace.rebase()[0].arrival_s == 0.0 and len(trace.head(2)) == 2


def test_length_scaling_rounds_and_keeps_one_token():
    trace = trace_of((0.0, 10, 3), (1.0, 1, 1))
    scaled = trace.scale_lengths(0.25, 2.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in scaled] == [(2, 6), (1, 2)]  # round(2.5) = 2


def test_capping_clips_each_length_then_shrinks_both_to_the_total():
    trace = trace_of((0.0, 1000, 300), (1.0, 100, 50), (2.0, 600, 10), (3.0, 10, 900))
    clipped = trace.cap_lengths(max_prompt_tokens=512, max_output_tokens=128, max_total_tokens=256)
    # (512, 128) -> x 0.4 -> output floor(51.2) = 51, prompt 205; (512, 10) -> output floor(4.9) = 4, prompt 252
    assert [(r.prompt_tokens, r.output_tokens) for r in clipped] == [(205, 51), (100, 50), (252, 4), (10, 128)]
    only_total = trace.cap_lengths(max_total_tokens=256)
    # (1000, 300): output floor(300 * 256 / 1300) = 59; (10, 900): output floor(900 * 256 / 910) = 253
    assert [(r.prompt_tokens, r.output_tokens) for r in only_total] == [(197, 59), (100, 50), (252, 4), (3, 253)]
    assert clipped[1] is trace[1]  # untouched requests are kept as they are
    dropped = trace.cap_lengths(max_prompt_tokens=512, max_total_tokens=256, mode="drop")
    assert [r.arrival_s for r in dropped] == [1.0]
    assert all(r.total_tokens <= 256 for r in clipped)
    with pytest.raises(ValueError):
        trace.cap_lengths(max_total_tokens=1)
    with pytest.raises(ValueError):
        trace.cap_lengths(mode="squash")
