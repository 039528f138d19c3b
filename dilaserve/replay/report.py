"""Comparison of systems: a markdown table and PNG plots (matplotlib, no display needed).

``write_report(out_dir, records_by_system)`` writes ``report.md`` with the table, and beside it
``latency_cdf.png``, ``controls_over_time.png`` (when the server reported thresholds or
chunk sizes) and, given load sweeps, ``attainment_vs_load.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from dilaserve.replay.metrics import LatencySummary, ReplayMetrics, compute_metrics
from dilaserve.replay.records import RequestRecord, Status


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ms(summary: LatencySummary | None) -> str:
    if summary is None:
        return "-"
    return " / ".join(f"{1000 * v:.0f}" for v in (summary.p50, summary.p90, summary.p99))


_ROWS: tuple[tuple[str, Callable[[ReplayMetrics], str]], ...] = (
    ("requests", lambda m: str(m.num_requests)),
    ("offered load (req/s)", lambda m: f"{m.offered_rps:.2f}"),
    ("**SLO attainment**", lambda m: f"**{_pct(m.slo_attainment)}**"),
    ("goodput (req/s)", lambda m: f"{m.goodput_rps:.2f}"),
    ("goodput (output tok/s)", lambda m: f"{m.goodput_tokens_per_s:.1f}"),
    ("refused (429)", lambda m: _pct(m.refused_share)),
    ("errors / timeouts", lambda m: f"{m.num_errors} / {m.num_timeouts}"),
    ("TTFT p50 / p90 / p99 (ms)", lambda m: _ms(m.ttft_s)),
    ("TPOT p50 / p90 / p99 (ms)", lambda m: _ms(m.tpot_s)),
    ("end-to-end p50 / p90 / p99 (ms)", lambda m: _ms(m.e2e_s)),
    ("accuracy (scored)", lambda m: "-" if m.accuracy is None else f"{_pct(m.accuracy)} (n={m.num_scored})"),
    ("mean threshold", lambda m: "-" if m.mean_threshold is None else f"{m.mean_threshold:.3f}"),
)


def metrics_table(metrics: Sequence[ReplayMetrics]) -> str:
    """A markdown table, one column per system."""
    lines = ["| metric | " + " | ".join(m.system or "(unnamed)" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for label, cell in _ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(m) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


# -- plots ---------------------------------------------------------------------------------
def _figure(num_panels: int, height: float = 3.4):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

    fig = Figure(figsize=(4.4 * num_panels, height), layout="constrained")
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    return fig, list(axes)


def plot_attainment_vs_load(sweeps: Mapping[str, Sequence[ReplayMetrics]], path: str | Path) -> Path:
    """SLO attainment against offered load, one line per system (each point one run)."""
    fig, (ax,) = _figure(1, height=3.6)
    for system, runs in sweeps.items():
        points = sorted((m.offered_rps, 100 * m.slo_attainment) for m in runs)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return Path(path)


def _cdf(ax, values: Sequence[float], label: str) -> None:
    ordered = sorted(values)
    n = len(ordered)
    ax.step([1000 * v for v in ordered], [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")


def plot_latency_cdfs(records_by_system: Mapping[str, Sequence[RequestRecord]], path: str | Path) -> Path:
    """CDFs of TTFT, TPOT and end-to-end latency of completed requests, per system."""
    fig, axes = _figure(3)
    for ax, (title, attr) in zip(axes, (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s"))):
        for system, records in records_by_system.items():
            values = [getattr(r, attr) for r in records if r.status is Status.OK and getattr(r, attr) is not None]
            if values:
                _cdf(ax, values, system)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of completed requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_controls_over_time(records_by_system: Mapping[str, Sequence[RequestRecord]], path: str | Path) -> Path | None:
    """Threshold and chunk size the server reported, against each request's finish time.

    Returns None (and writes nothing) when no record carries either."""
    panels = [(label, attr) for label, attr in (("confidence threshold", "threshold_used"), ("chunk size", "chunk_size"))
              if any(getattr(r, attr) is not None for rs in records_by_system.values() for r in rs)]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (label, attr) in zip(axes, panels):
        for system, records in records_by_system.items():
            points = [((r.finish_s if r.finish_s is not None else r.arrival_s), getattr(r, attr))
                      for r in records if getattr(r, attr) is not None]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=8, alpha=0.6, label=system)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return Path(path)


@dataclass
class ReportFiles:
    markdown: Path
    plots: list[Path] = field(default_factory=list)


def write_report(
    out_dir: str | Path, records_by_system: Mapping[str, Sequence[RequestRecord]], *,
    sweeps: Mapping[str, Sequence[ReplayMetrics]] | None = None, title: str = "Trace replay",
    notes: str = "",
) -> ReportFiles:
    """``report.md`` and the plots for these systems, in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [compute_metrics(records, system=system) for system, records in records_by_system.items()]
    plots = [plot_latency_cdfs(records_by_system, out / "latency_cdf.png")]
    controls = plot_controls_over_time(records_by_system, out / "controls_over_time.png")
    if controls is not None:
        plots.append(controls)
    if sweeps:
        plots.append(plot_attainment_vs_load(sweeps, out / "attainment_vs_load.png"))
    text = [f"# {title}", "", metrics_table(metrics)]
    if notes:
        text += [notes.strip(), ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    markdown = out / "report.md"
    markdown.write_text("\n".join(text) + "\n")
    return ReportFiles(markdown, plots)
