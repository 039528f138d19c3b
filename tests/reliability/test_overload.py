"""Overload: offered load at 3x the replica's capacity, then back to a light load.

One replica of a model that spends its time in the engine (the ``heavy`` deployment), so the
replica, not the HTTP front end, is what saturates. Capacity is measured first (4 clients
back to back, best effort). Then ``DILASERVE_OVERLOAD_S`` seconds (default 20; ``scripts/soak.py
--rate-factor 3 --minutes 1`` is the minute-long version) of Poisson arrivals at 3x that, then
10 s at 0.3x. Checked: every request sent is answered (completion or 429 with Retry-After and a
message); refusals are fast; the replica's queue, free pages and memory stay bounded; the first
requests after the drop are admitted and on time. The admitted requests' SLO attainment is
printed and held to the issue's 95%.
"""

from __future__ import annotations

import os

from .reliability_helpers import (
    closed_loop_rps, completion_body, engine_stats, format_table, latency_summary_ms, replica_pids, rss_mib,
    run_open_loop, sampler, tally, wait_until, window_rows,
)

OVERLOAD_S = float(os.environ.get("DILASERVE_OVERLOAD_S", "20"))
FACTOR = 3.0
LIGHT_S = 10.0


def body(i: int) -> dict:
    return completion_body(i, max_tokens=64, block_length=32)


def test_three_times_capacity_sheds_fast_and_recovers(heavy):
    url = heavy.url
    capacity = closed_loop_rps(url, 4, 8.0, body)
    assert wait_until(lambda: engine_stats(url)["cpu-0"]["num_running"] == 0, 60)
    pid = replica_pids("rel-heavy")["cpu-0"]
    rss_before = rss_mib(pid)
    samples: list = []
    rate = lambda t: FACTOR * capacity if t < OVERLOAD_S else 0.3 * capacity  # noqa: E731
    outcomes = run_open_loop(url, rate, OVERLOAD_S + LIGHT_S, body, on_tick=sampler(url, "rel-heavy", samples, 2.0))
    rss_after = rss_mib(pid)
    scale_after = engine_stats(url)["cpu-0"]["prediction_scale"]
    over = [o for o in outcomes if o.sent_s < OVERLOAD_S]
    light = [o for o in outcomes if o.sent_s >= OVERLOAD_S + 3.0]  # once the overload's backlog has drained
    t, t_over = tally(outcomes), tally(over)
    refusals = latency_summary_ms([o.latency_s for o in outcomes if o.kind == "refused"])
    print(f"\ncapacity {capacity:.2f} req/s; offered {FACTOR}x for {OVERLOAD_S:.0f} s then 0.3x for {LIGHT_S:.0f} s")
    print(f"sent {t.sent}, answered {t.answered}: {t.by_status}; during overload {t_over.ok} admitted, "
          f"{t_over.refused} refused, admitted attainment {t_over.attainment:.1%}")
    print(f"refusal latency ms: {refusals}; prediction scale at the end {scale_after:.2f}")
    print(f"replica RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    print(format_table(window_rows(outcomes, samples, 5.0)))

    assert t.sent == t.answered and t.lost == 0 and t.errors == 0, t
    assert t_over.refused > 0, "3x capacity was all admitted: admission did not engage"
    for o in outcomes:
        if o.kind == "refused":
            assert o.retry_after and o.retry_after.isdigit() and o.message, o
    assert refusals["p50"] < 50 and refusals["p95"] < 150, refusals
    assert max(max(s.num_waiting.values()) for s in samples) <= 64, "the waiting queue grew without bound"
    assert min(min(s.pages_free.values()) for s in samples) >= 0
    assert rss_after - rss_before < 300, (rss_before, rss_after)
    assert light and all(o.kind == "ok" for o in light), tally(light)
    assert sum(bool(o.slo_met) for o in light) >= 0.9 * len(light), tally(light)
    assert wait_until(lambda: (s := engine_stats(url)["cpu-0"])["pages_free"] == s["pages_total"], 60)
    # The bar. Measured 98.0-99.1% over three runs on an idle 2-core machine (64-68% of
    # the overload refused). Before predictions were judged with the delay of later newcomers
    # charged to them, and before running requests were priced at their block's pace, 68-92%:
    # the first seconds of the overload were admitted on predictions 2-5x short.
    assert t_over.attainment >= 0.95, f"admitted requests met their SLO {t_over.attainment:.1%} of the time"
    print(f"admitted attainment under 3x overload: {t_over.attainment:.1%}")
