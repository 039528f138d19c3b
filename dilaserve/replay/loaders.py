"""Readers for production trace files, and a writer for the Azure format.

Formats (columns matched by name, case-insensitively, in any order; extra columns ignored):

- **Azure LLM inference trace** 2023 / 2024: ``TIMESTAMP,ContextTokens,GeneratedTokens``.
  ``TIMESTAMP`` is a wall-clock time such as ``2023-11-16 18:15:46.6805900`` (any number of
  fractional digits, optional ``T`` separator, optional ``Z`` / ``+00:00`` zone) or a number
  of seconds.
- **BurstGPT**: ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``
  (newer releases add ``Session ID`` and ``Elapsed time``); ``Timestamp`` is in seconds.
  Rows with 0 response tokens are failed requests.

A malformed row (wrong field count, bad time, bad or negative count) is skipped and counted
in the ``LoadReport``; a file that is missing or lacks the required columns raises
``TraceFormatError``. Rows are sorted by time and the first arrival put at 0.
"""

from __future__ import annotations

import calendar
import csv
import logging
import math
import re
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterator, Literal

from dilaserve.errors import DiLaServeError
from dilaserve.replay.trace import LoadReport, Trace, TraceRequest

log = logging.getLogger(__name__)

TraceFormat = Literal["azure", "burstgpt"]
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
_MAX_LISTED_LINES = 10

_TIME_RE = re.compile(
    r"^(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$"
)


class TraceFormatError(DiLaServeError):
    """A trace file cannot be read at all: missing, empty, or without the required columns."""


def parse_timestamp(text: str) -> float:
    """Seconds since the Unix epoch (UTC when no zone is given) of a wall-clock time or a number.

    Raises ``ValueError`` for anything else. Fractional digits beyond microseconds are kept
    (the Azure trace has seven).
    """
    text = text.strip()
    match = _TIME_RE.match(text)
    if match is None:
        value = float(text)  # ValueError for anything that is not a number either
        if not math.isfinite(value):
            raise ValueError(f"timestamp {text!r} is not finite")
        return value
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zone = match.group(7), match.group(8)
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour < 24 and minute < 60 and second < 61):
        raise ValueError(f"timestamp {text!r} is out of range")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _parse_count(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


class _Rows:
    """Lines of a CSV file as field lists with their line numbers, counting what was skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.num_rows = 0
        self.reasons: Counter[str] = Counter()
        self.bad_lines: list[int] = []

    def skip(self, line_number: int, reason: str) -> None:
        self.reasons[reason] += 1
        if len(self.bad_lines) < _MAX_LISTED_LINES:
            self.bad_lines.append(line_number)

    def read(self, required: tuple[str, ...], max_rows: int | None) -> Iterator[tuple[int, dict[str, str]]]:
        """Yield ``(line_number, {required column: text})`` for each data row of the right width."""
        try:
            handle = open(self.path, encoding="utf-8-sig", errors="replace", newline="")
        except OSError as exc:
            raise TraceFormatError(f"cannot read trace {self.path}: {exc.strerror or exc}") from None
        with handle:
            header: list[str] | None = None
            for line_number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = _split(line)
                if header is None:
                    if fields is None:
                        raise TraceFormatError(f"{self.path}: cannot parse the header line {line[:200]!r}")
                    header = [f.strip().lower() for f in fields]
                    missing = [c for c in required if c.lower() not in header]
                    if missing:
                        raise TraceFormatError(
                            f"{self.path}: header {line[:200]!r} lacks column(s) {missing}; expected {list(required)}")
                    index = {c: header.index(c.lower()) for c in required}
                    continue
                if max_rows is not None and self.num_rows >= max_rows:
                    break
                self.num_rows += 1
                if fields is None or len(fields) != len(header):
                    self.skip(line_number, "wrong number of fields")
                    continue
                yield line_number, {c: fields[i] for c, i in index.items()}
            if header is None:
                raise TraceFormatError(f"{self.path} is empty: expected a header with {list(required)}")

    def report(self, num_loaded: int, num_filtered: int) -> LoadReport:
        return LoadReport(
            source=str(self.path), num_rows=self.num_rows, num_loaded=num_loaded, num_filtered=num_filtered,
            num_malformed=sum(self.reasons.values()), malformed_reasons=dict(self.reasons),
            first_malformed_lines=tuple(self.bad_lines),
        )


def _split(line: str) -> list[str] | None:
    if '"' not in line:
        return line.split(",")
    try:
        return next(csv.reader([line]))
    except (csv.Error, StopIteration):
        return None


def _load(
    path: str | Path, required: tuple[str, ...], parse: Callable[[dict[str, str]], tuple[float, int, int] | None],
    *, keep_failed: bool, max_rows: int | None, name: str,
) -> tuple[Trace, LoadReport]:
    rows = _Rows(Path(path))
    loaded: list[tuple[float, int, int]] = []
    num_filtered = 0
    for line_number, fields in rows.read(required, max_rows):
        try:
            parsed = parse(fields)
        except ValueError as exc:
            rows.skip(line_number, str(exc).split(":")[0])
            continue
        if parsed is None:
            num_filtered += 1
            continue
        t, prompt, output = parsed
        if prompt < 1 or output < 0:
            rows.skip(line_number, "token count out of range")
            continue
        if output == 0 and not keep_failed:
            num_filtered += 1  # a failed request: it produced nothing
            continue
        loaded.append((t, prompt, output))
    loaded.sort(key=lambda row: row[0])
    t0 = loaded[0][0] if loaded else 0.0
    trace = Trace(tuple(TraceRequest(t - t0, p, o) for t, p, o in loaded), name=name)
    report = rows.report(len(loaded), num_filtered)
    (log.warning if report.num_malformed else log.info)("%s", report.summary())
    return trace, report


def _field(parse: Callable[[str], float | int], what: str, text: str):
    try:
        return parse(text)
    except (ValueError, OverflowError):
        raise ValueError(f"bad {what}: {text[:40]!r}") from None


def load_azure_csv(path: str | Path, *, keep_failed: bool = False, max_rows: int | None = None) -> tuple[Trace, LoadReport]:
    """An Azure LLM inference trace (2023 or 2024). ``max_rows`` stops after that many data rows."""

    def parse(f: dict[str, str]) -> tuple[float, int, int]:
        return (_field(parse_timestamp, "timestamp", f["TIMESTAMP"]),
                _field(_parse_count, "token count", f["ContextTokens"]),
                _field(_parse_count, "token count", f["GeneratedTokens"]))

    return _load(path, AZURE_COLUMNS, parse, keep_failed=keep_failed, max_rows=max_rows, name=Path(path).stem)


def load_burstgpt_csv(
    path: str | Path, *, model: str | None = None, log_type: str | None = None, keep_failed: bool = False,
    max_rows: int | None = None,
) -> tuple[Trace, LoadReport]:
    """A BurstGPT trace; ``model`` (e.g. ``ChatGPT``, ``GPT-4``) and ``log_type`` (e.g.
    ``Conversation log``, ``API log``) keep only matching rows (case-insensitive).
    Failed rows (0 response tokens) are filtered unless ``keep_failed``."""
    required = ("Timestamp", "Request tokens", "Response tokens") + (("Model",) if model else ()) + (
        ("Log Type",) if log_type else ())

    def parse(f: dict[str, str]) -> tuple[float, int, int] | None:
        if model and f["Model"].strip().lower() != model.lower():
            return None
        if log_type and f["Log Type"].strip().lower() != log_type.lower():
            return None
        t = _field(float, "timestamp", f["Timestamp"])
        if not math.isfinite(t):
            raise ValueError(f"bad timestamp: {f['Timestamp'][:40]!r}")
        return (t, _field(_parse_count, "token count", f["Request tokens"]),
                _field(_parse_count, "token count", f["Response tokens"]))

    suffix = f"[{model}]" if model else ""
    return _load(path, required, parse, keep_failed=keep_failed, max_rows=max_rows, name=Path(path).stem + suffix)


def detect_format(path: str | Path) -> TraceFormat:
    """``azure`` or ``burstgpt`` from a file's header row."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            header = handle.readline().lower()
    except OSError as exc:
        raise TraceFormatError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    if "contexttokens" in header:
        return "azure"
    if "request tokens" in header:
        return "burstgpt"
    raise TraceFormatError(
        f"{path}: cannot tell the format from its header {header.strip()[:200]!r}; expected Azure "
        f"({','.join(AZURE_COLUMNS)}) or BurstGPT ({','.join(BURSTGPT_COLUMNS)})")


def load_trace(
    path: str | Path, format: TraceFormat | Literal["auto"] = "auto", *, model: str | None = None,
    keep_failed: bool = False, max_rows: int | None = None,
) -> tuple[Trace, LoadReport]:
    """Load a trace file of either format (``auto`` reads the header)."""
    if format == "auto":
        format = detect_format(path)
    if format == "azure":
        if model:
            raise TraceFormatError("the Azure trace has no model column: drop --model filter")
        return load_azure_csv(path, keep_failed=keep_failed, max_rows=max_rows)
    if format == "burstgpt":
        return load_burstgpt_csv(path, model=model, keep_failed=keep_failed, max_rows=max_rows)
    raise TraceFormatError(f"unknown trace format {format!r}; known: auto, azure, burstgpt")


AZURE_EPOCH = datetime(2023, 11, 16, 18, 0, 0)


def write_azure_csv(trace: Trace, path: str | Path, *, start: datetime = AZURE_EPOCH) -> Path:
    """Write ``trace`` in the Azure 2023 format (seven fractional digits, as the real file)."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        handle.write(",".join(AZURE_COLUMNS) + "\r\n")
        for r in trace:
            ticks = round(r.arrival_s * 10_000_000)  # 100 ns ticks
            seconds, ticks = divmod(ticks, 10_000_000)
            stamp = (start + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S")
            handle.write(f"{stamp}.{ticks:07d},{r.prompt_tokens},{r.output_tokens}\r\n")
    return path
