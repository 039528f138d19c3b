"""The load the planner plans for: an arrival rate and one representative request length.

The planner prices one request shape: the prompt and output lengths of a chosen statistic
(``mean``, or a percentile such as ``p90`` for a conservative plan) of the observed lengths,
each taken on its own, or ``work``: the mean output and the prompt that makes one request's
work the samples' mean work. A cached dLLM request's work is about its output (blocks, steps)
times its sequence (each block's refresh reads the whole of it), so with heavy-tailed,
correlated lengths (long prompts with long answers, as in production traces) the mean of the
products is well above the product of the means, and a plan on mean lengths under-provisions:
``work`` uses ``prompt = sum(o * (p + o)) / sum(o) - mean(o)``, the context an average
generated token sees. Lengths come from samples (a controller's recent requests, a trace
CSV, a JSON list) or from a summary that already holds the statistic:

    [[374, 44], [396, 109], ...]                               # (prompt, output) samples
    {"samples": [[374, 44], ...]}                              # the same, wrapped
    {"prompt_tokens": {"mean": 1155, "p90": 2900},
     "output_tokens": {"mean": 211, "p90": 480}}               # a summary
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from dilaserve.errors import DiLaServeError

_STATISTIC_RE = re.compile(r"^(mean|work|p(100|\d{1,2}(?:\.\d+)?))$")


class WorkloadError(DiLaServeError):
    """A lengths file cannot be read, or a length statistic is malformed."""


@dataclass(frozen=True)
class Workload:
    rate_rps: float  # arrivals, requests per second
    prompt_tokens: int  # representative prompt length
    output_tokens: int  # representative generated length
    length_statistic: str = "mean"  # how the two lengths were chosen, for reports

    def with_rate(self, rate_rps: float) -> "Workload":
        return replace(self, rate_rps=rate_rps)

    @classmethod
    def from_samples(cls, rate_rps: float, samples: Iterable[tuple[int, int]], statistic: str = "mean") -> "Workload":
        """The workload whose lengths are ``statistic`` of ``(prompt, output)`` samples."""
        pairs = [(int(p), int(o)) for p, o in samples]
        if not pairs:
            raise WorkloadError("no length samples")
        if statistic == "work":
            prompt, output = _work_lengths(pairs)
        else:
            prompt = _statistic([p for p, _ in pairs], statistic)
            output = _statistic([o for _, o in pairs], statistic)
        return cls(rate_rps, prompt, max(1, output), statistic)


def _check_statistic(statistic: str) -> float | None:
    """The quantile in [0, 1] a statistic names (None for the mean and for work)."""
    match = _STATISTIC_RE.match(statistic)
    if match is None:
        raise WorkloadError(f"length statistic must be 'mean', 'work' or 'pNN' (e.g. p90), got {statistic!r}")
    return None if match.group(2) is None else float(match.group(2)) / 100


def _work_lengths(pairs: list[tuple[int, int]]) -> tuple[int, int]:
    """(prompt, output) of the same mean work as the samples: the mean output, and the prompt
    for which output x (prompt + output) is the samples' mean of it."""
    total_output = sum(o for _, o in pairs)
    output = total_output / len(pairs)
    if total_output == 0:
        return round(sum(p for p, _ in pairs) / len(pairs)), 0
    context = sum(o * (p + o) for p, o in pairs) / total_output  # the sequence a generated token sees
    return max(0, round(context - output)), round(output)


def _statistic(values: list[int], statistic: str) -> int:
    quantile = _check_statistic(statistic)
    if quantile is None:
        return round(sum(values) / len(values))
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))]  # nearest rank


def _from_summary(data: dict, statistic: str, where: str) -> tuple[int, int]:
    _check_statistic(statistic)
    lengths = []
    for key in ("prompt_tokens", "output_tokens"):
        stats = data.get(key)
        if not isinstance(stats, dict):
            raise WorkloadError(f"{where}: expected {key!r} as an object of statistics, e.g. {{\"mean\": 256}}")
        value = stats.get(statistic)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            known = ", ".join(sorted(stats)) or "none"
            raise WorkloadError(f"{where}: {key} has no usable {statistic!r} (it has: {known})")
        lengths.append(round(value))
    return lengths[0], lengths[1]


def _pairs(rows: Any, where: str) -> list[tuple[int, int]]:
    pairs = []
    for i, row in enumerate(rows):
        if (not isinstance(row, (list, tuple)) or len(row) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)):
            raise WorkloadError(f"{where}: sample {i} must be [prompt_tokens, output_tokens], got {row!r}")
        pairs.append((row[0], row[1]))
    if not pairs:
        raise WorkloadError(f"{where}: no length samples")
    return pairs


def load_workload(path: str | Path, rate_rps: float, statistic: str = "mean") -> Workload:
    """A workload of ``rate_rps`` with lengths from a JSON file (samples or summary) or a trace
    CSV (Azure or BurstGPT, read by the replay loaders)."""
    path = Path(path)
    _check_statistic(statistic)
    if path.suffix.lower() == ".csv":
        from dilaserve.replay.loaders import load_trace

        trace, _ = load_trace(path)
        samples = [(r.prompt_tokens, r.output_tokens) for r in trace.requests]
        if not samples:
            raise WorkloadError(f"{path}: the trace holds no requests")
        return Workload.from_samples(rate_rps, samples, statistic)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkloadError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot read it as JSON ({exc})") from None
    if isinstance(data, dict) and "samples" in data:
        data = data["samples"]
    if isinstance(data, list):
        return Workload.from_samples(rate_rps, _pairs(data, str(path)), statistic)
    if isinstance(data, dict):
        prompt, output = _from_summary(data, statistic, str(path))
        return Workload(rate_rps, prompt, max(1, output), statistic)
    raise WorkloadError(f"{path}: expected a list of [prompt, output] samples or a summary object")
