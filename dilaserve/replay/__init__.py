"""Trace replay and SLO evaluation: traces, an open-loop client, records, metrics, reports.

Layout: ``trace`` (the ``Trace`` type and its transformations), ``loaders`` (Azure and
BurstGPT files), ``synthetic`` (arrival processes and length models), ``prompts`` (prompts of
a given length, with scorers), ``slo`` (deadlines), ``client`` (the replayer), ``records``,
``metrics`` and ``report``. Everything but ``client`` is plain Python and numpy.
"""

from dilaserve.replay.loaders import TraceFormatError, load_azure_csv, load_burstgpt_csv, load_trace, write_azure_csv
from dilaserve.replay.metrics import LatencySummary, ReplayMetrics, compute_metrics, percentile
from dilaserve.replay.records import RequestRecord, Status, load_records, save_records
from dilaserve.replay.slo import BaselineLatency, LinearLatency, fit_linear_latency
from dilaserve.replay.trace import LoadReport, Trace, TraceRequest

__all__ = [
    "BaselineLatency", "LatencySummary", "LinearLatency", "LoadReport", "ReplayMetrics", "RequestRecord",
    "Status", "Trace", "TraceFormatError", "TraceRequest", "compute_metrics", "fit_linear_latency",
    "load_azure_csv", "load_burstgpt_csv", "load_records", "load_trace", "percentile", "save_records",
    "write_azure_csv",
]
