"""The markdown comparison table and the PNG plots."""

from __future__ import annotations

from dataclasses import replace

from test_replay_metrics import RECORDS

from dilaserve.replay.metrics import compute_metrics
from dilaserve.replay.report import metrics_table, plot_controls_over_time, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_table_puts_systems_side_by_side():
    other = [replace(r, system="static", status=r.status, threshold_used=None) for r in RECORDS[:2]]
    table = metrics_table([compute_metrics(RECORDS), compute_metrics(other)])
    lines = table.splitlines()
    assert lines[0] == "| metric | A | static |"
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert row["**SLO attainment**"] == ["**33.3%**", "**50.0%**"]
    assert row["refused (429)"] == ["16.7%", "0.0%"]
    assert row["TTFT p50 / p90 / p99 (ms)"][0] == "200 / 440 / 494"
    assert row["accuracy (scored)"] == ["50.0% (n=2)", "50.0% (n=2)"]
    assert row["mean threshold"] == ["0.800", "-"]
    assert row["errors / timeouts"] == ["1 / 1", "0 / 0"]


def test_report_files(tmp_path):
    static = [replace(r, system="static", threshold_used=None) for r in RECORDS]
    sweeps = {"A": [compute_metrics(RECORDS), compute_metrics(RECORDS[:3])], "static": [compute_metrics(static)]}
    files = write_report(tmp_path / "out", {"A": RECORDS, "static": static}, sweeps=sweeps, notes="two systems")
    text = files.markdown.read_text()
    assert "| metric | A | static |" in text and "two systems" in text
    names = sorted(p.name for p in files.plots)
    assert names == ["attainment_vs_load.png", "controls_over_time.png", "latency_cdf.png"]
    for plot in files.plots:
        assert plot.read_bytes()[:8] == PNG_MAGIC and f"({plot.name})" in text


def test_no_controls_plot_without_server_reports(tmp_path):
    bare = [replace(r, threshold_used=None, chunk_size=None) for r in RECORDS]
    assert plot_controls_over_time({"A": bare}, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
    files = write_report(tmp_path, {"A": bare})
    assert [p.name for p in files.plots] == ["latency_cdf.png"]
