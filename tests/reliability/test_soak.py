"""Soak, short version: ~70% of the measured capacity for ``DILASERVE_SOAK_S`` seconds
(default 60; ``scripts/soak.py`` runs the same for 30 minutes and plots it). One minute rather
than two keeps the CPU suite within its time budget; it still covers a few hundred requests
and a dozen samples, enough to see a leak of pages or a steady climb of memory.

Checked: every request answered; no errors; the replica's RSS does not climb (its last
samples stay within 100 MiB of its first ones); KV pages all come back; latency does not
drift (the last third's p50 within 3x + 0.5 s of the first third's: a minute of Poisson
arrivals is noisy, a replica falling behind is not subtle).
"""

from __future__ import annotations

import os

from .reliability_helpers import (
    closed_loop_rps, completion_body, engine_stats, format_table, percentile, run_open_loop, sampler, tally,
    wait_until, window_rows,
)

SOAK_S = float(os.environ.get("DILASERVE_SOAK_S", "60"))


def body(i: int) -> dict:
    return completion_body(i, max_tokens=64, block_length=32)


def test_soak_at_seventy_percent_of_capacity(heavy):
    url = heavy.url
    capacity = closed_loop_rps(url, 4, 8.0, body)
    samples: list = []
    outcomes = run_open_loop(url, 0.7 * capacity, SOAK_S, body, on_tick=sampler(url, "rel-heavy", samples, 5.0))
    t = tally(outcomes)
    print(f"\nsoak {SOAK_S:.0f} s at {0.7 * capacity:.2f} req/s (capacity {capacity:.2f}): sent {t.sent}, "
          f"answered {t.answered}, {t.by_status}, admitted attainment {t.attainment:.1%}")
    print(format_table(window_rows(outcomes, samples, 10.0)))
    assert t.sent == t.answered and t.lost == 0 and t.errors == 0, t
    rss = [s.rss_mib["cpu-0"] for s in samples if s.rss_mib.get("cpu-0")]
    assert len(rss) >= 4
    assert max(rss[-2:]) - min(rss[:2]) < 100, rss
    third = SOAK_S / 3
    first = [o.latency_s for o in outcomes if o.kind == "ok" and o.sent_s < third]
    last = [o.latency_s for o in outcomes if o.kind == "ok" and o.sent_s >= 2 * third]
    # 20 s of Poisson arrivals is a noisy median (the CI run saw 0.70 -> 1.62 s with nothing wrong);
    # a replica falling behind at 70% load would queue for tens of seconds by the last third.
    assert percentile(last, 50) < 3 * percentile(first, 50) + 0.5, (percentile(first, 50), percentile(last, 50))
    assert wait_until(lambda: (s := engine_stats(url)["cpu-0"])["pages_free"] == s["pages_total"], 60)
