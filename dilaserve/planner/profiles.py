"""Latency and quality profiles: the files the profiler writes and the planner reads.

A *latency profile* (one device, one model) holds, for each parallelism degree ``p``, the
engine's per-step cost coefficients (``StepCost``) and what one instance can hold at once:

    {"model": "llada-8b", "device": "H200", "cache": "dual", "illustrative": false,
     "degrees": [{"degree": 1, "fixed_s": 0.006, "per_token_s": 3.2e-05, "per_context_s": 1.3e-07,
                  "max_running": 256, "kv_capacity_tokens": 190000}, ...]}

A *quality profile* (one model, one task) holds, for each confidence threshold (and
optionally chunk size and sparse-KV retention), the accuracy measured and the mean tokens
decided per step:

    {"model": "llada-8b", "task": "gsm8k", "block_size": 32, "illustrative": false,
     "entries": [{"threshold": 0.9, "chunk": 32, "accuracy": 0.785, "accuracy_ci": [0.763, 0.807],
                  "tokens_per_step": 3.25, "num": 1319},
                 {"threshold": 0.9, "chunk": 32, "kv_retention": 0.5, "accuracy": 0.775, ...}, ...]}

``kv_retention`` is head-centric sparse KV's retention, as ``SamplingParams.kv_retention``:
absent or null means dense (so files written before sparse KV read as dense throughout).

Accuracy is a fraction in [0, 1]. docs/planner.md is the reference for both formats. A file
that breaks them raises ``ProfileError`` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dilaserve.engine.cost_model import StepCost
from dilaserve.errors import DiLaServeError

DEFAULT_PROFILES_DIR = Path(__file__).with_name("default_profiles")
LATENCY_FILE = "latency.json"
QUALITY_FILE = "quality.json"
CACHE_MODES = ("none", "prefix", "dual")


class ProfileError(DiLaServeError):
    """A profile file is missing, is not JSON, or breaks the profile format."""


@dataclass(frozen=True)
class DegreeProfile:
    """One instance of ``degree`` GPUs: its step cost and how much it holds at once."""

    degree: int  # GPUs per instance (tensor parallel)
    cost: StepCost
    max_running: int  # requests decoding at once
    kv_capacity_tokens: int  # KV-cache tokens (prompt + generated, all requests) one instance holds


@dataclass(frozen=True)
class LatencyProfile:
    degrees: tuple[DegreeProfile, ...]  # sorted by degree
    cache: str = "dual"  # KV-cache mode the coefficients were measured with
    model: str = ""
    device: str = ""
    is_illustrative: bool = False  # placeholder numbers, not measured

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "cache": self.cache, "illustrative": self.is_illustrative,
                "degrees": [{"degree": d.degree, "fixed_s": d.cost.fixed_s, "per_token_s": d.cost.per_token_s,
                             "per_context_s": d.cost.per_context_s, "max_running": d.max_running,
                             "kv_capacity_tokens": d.kv_capacity_tokens} for d in self.degrees]}


@dataclass(frozen=True)
class QualityEntry:
    threshold: float
    accuracy: float  # fraction correct, in [0, 1]
    tokens_per_step: float  # mean tokens decided per decoding step
    chunk: int | None = None  # query positions per step; None: the whole block
    accuracy_ci: tuple[float, float] | None = None
    num: int | None = None  # examples the accuracy was measured on
    kv_retention: float | None = None  # sparse KV's share of out-of-block positions kept; None: dense

    @property
    def setting(self) -> tuple[float, float | None]:
        """What the planner chooses between: (threshold, kv_retention)."""
        return (self.threshold, self.kv_retention)


@dataclass(frozen=True)
class QualityProfile:
    block_size: int  # tokens per semi-autoregressive block
    entries: tuple[QualityEntry, ...]
    model: str = ""
    task: str = ""
    is_illustrative: bool = False

    def settings(self) -> tuple[QualityEntry, ...]:
        """One entry per (threshold, kv_retention): highest threshold first, dense before sparse,
        then higher retention first.

        The cost model prices a reuse step over the whole block, so where a setting was
        measured at several chunk sizes the planner takes the whole-block entry (``chunk``
        None or ``block_size``), else the largest chunk. Smaller chunks are the replica's
        chunk controller's business, not the planner's.
        """
        def chunk(entry: QualityEntry) -> int:
            return self.block_size if entry.chunk is None else min(entry.chunk, self.block_size)

        best: dict[tuple[float, float | None], QualityEntry] = {}
        for entry in self.entries:
            if entry.setting not in best or chunk(entry) > chunk(best[entry.setting]):
                best[entry.setting] = entry
        return tuple(sorted(best.values(), key=lambda e: (-e.threshold, e.kv_retention is not None,
                                                          -(e.kv_retention or 0.0))))

    @property
    def has_sparse(self) -> bool:
        return any(e.kv_retention is not None for e in self.entries)

    def without_sparse(self) -> "QualityProfile":
        """The dense entries only (for consumers that cannot run sparse KV, such as the simulator)."""
        return replace(self, entries=tuple(e for e in self.entries if e.kv_retention is None))

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for e in self.entries:
            row: dict[str, Any] = {"threshold": e.threshold, "chunk": e.chunk, "accuracy": e.accuracy,
                                   "accuracy_ci": list(e.accuracy_ci) if e.accuracy_ci else None,
                                   "tokens_per_step": e.tokens_per_step, "num": e.num, "kv_retention": e.kv_retention}
            entries.append({k: v for k, v in row.items() if v is not None})
        return {"model": self.model, "task": self.task, "block_size": self.block_size,
                "illustrative": self.is_illustrative, "entries": entries}


@dataclass(frozen=True)
class ProfileSet:
    """What the planner reads: one latency profile and one quality profile of the same model."""

    latency: LatencyProfile
    quality: QualityProfile
    source: str = ""  # where they were read from, for reports

    @property
    def is_illustrative(self) -> bool:
        return self.latency.is_illustrative or self.quality.is_illustrative

    def without_sparse(self) -> "ProfileSet":
        return replace(self, quality=self.quality.without_sparse())


# -- reading -----------------------------------------------------------------------------------
def _number(obj: dict, key: str, where: str, *, minimum: float | None = None, maximum: float | None = None,
            exclusive_min: bool = False, integer: bool = False, default: Any = ...) -> Any:
    if key not in obj or obj[key] is None:
        if default is ...:
            raise ProfileError(f"{where}: missing field {key!r}")
        return default
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{where}: {key!r} must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise ProfileError(f"{where}: {key!r} must be a whole number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise ProfileError(f"{where}: {key!r} must be {'>' if exclusive_min else '>='} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ProfileError(f"{where}: {key!r} must be <= {maximum}, got {value!r}")
    return int(value) if integer else float(value)


def _list(obj: dict, key: str, where: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{where}: {key!r} must be a non-empty list")
    return value


def latency_profile_from_dict(data: Any, where: str = "latency profile") -> LatencyProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a JSON object")
    cache = data.get("cache", "dual")
    if cache not in CACHE_MODES:
        raise ProfileError(f"{where}: 'cache' must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    degrees: dict[int, DegreeProfile] = {}
    for i, row in enumerate(_list(data, "degrees", where)):
        at = f"{where}: degrees[{i}]"
        if not isinstance(row, dict):
            raise ProfileError(f"{at}: expected an object")
        p = _number(row, "degree", at, minimum=1, integer=True)
        if p in degrees:
            raise ProfileError(f"{at}: degree {p} appears twice")
        cost = StepCost(_number(row, "fixed_s", at, minimum=0), _number(row, "per_token_s", at, minimum=0),
                        _number(row, "per_context_s", at, minimum=0))
        if cost.fixed_s + cost.per_token_s + cost.per_context_s <= 0:
            raise ProfileError(f"{at}: a step cannot cost nothing (all coefficients are 0)")
        degrees[p] = DegreeProfile(p, cost, _number(row, "max_running", at, minimum=1, integer=True),
                                   _number(row, "kv_capacity_tokens", at, minimum=1, integer=True))
    return LatencyProfile(tuple(degrees[p] for p in sorted(degrees)), cache, str(data.get("model", "")),
                          str(data.get("device", "")), bool(data.get("illustrative", False)))


def quality_profile_from_dict(data: Any, where: str = "quality profile") -> QualityProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a JSON object")
    block_size = _number(data, "block_size", where, minimum=1, integer=True)
    entries: list[QualityEntry] = []
    seen: set[tuple[float, int | None, float | None]] = set()
    for i, row in enumerate(_list(data, "entries", where)):
        at = f"{where}: entries[{i}]"
        if not isinstance(row, dict):
            raise ProfileError(f"{at}: expected an object")
        if row.get("threshold") is None and row.get("steps") is not None:
            continue  # a fixed-steps baseline the profiler also measures: not a setting to plan
        threshold = _number(row, "threshold", at, minimum=0, maximum=1, exclusive_min=True)
        chunk = _number(row, "chunk", at, minimum=1, integer=True, default=None)
        retention = _number(row, "kv_retention", at, minimum=0, maximum=1, exclusive_min=True, default=None)
        if (threshold, chunk, retention) in seen:
            sparse = f" and kv_retention {retention}" if retention is not None else ""
            raise ProfileError(f"{at}: threshold {threshold} with chunk {chunk}{sparse} appears twice")
        seen.add((threshold, chunk, retention))
        ci = row.get("accuracy_ci")
        if ci is not None:
            if (not isinstance(ci, list) or len(ci) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ci)):
                raise ProfileError(f"{at}: 'accuracy_ci' must be [low, high], got {ci!r}")
            ci = (float(ci[0]), float(ci[1]))
        entries.append(QualityEntry(
            threshold, _number(row, "accuracy", at, minimum=0, maximum=1),
            _number(row, "tokens_per_step", at, minimum=1, maximum=block_size), chunk, ci,
            _number(row, "num", at, minimum=0, integer=True, default=None), retention))
    if not entries:
        raise ProfileError(f"{where}: no entry with a threshold (fixed-steps entries are not planned)")
    return QualityProfile(block_size, tuple(entries), str(data.get("model", "")), str(data.get("task", "")),
                          bool(data.get("illustrative", False)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from None


def load_latency_profile(path: str | Path) -> LatencyProfile:
    return latency_profile_from_dict(_read_json(Path(path)), str(path))


def load_quality_profile(path: str | Path) -> QualityProfile:
    return quality_profile_from_dict(_read_json(Path(path)), str(path))


def load_profile_set(directory: str | Path | None = None, *, latency: str | Path | None = None,
                     quality: str | Path | None = None) -> ProfileSet:
    """``latency.json`` and ``quality.json`` from ``directory`` (the shipped, illustrative
    defaults when None); ``latency`` / ``quality`` name files that replace either one."""
    root = Path(directory) if directory is not None else DEFAULT_PROFILES_DIR
    if directory is not None and not root.is_dir():
        raise ProfileError(f"{root}: not a directory (expected {LATENCY_FILE} and {QUALITY_FILE} in it)")
    latency_path = Path(latency) if latency is not None else root / LATENCY_FILE
    quality_path = Path(quality) if quality is not None else root / QUALITY_FILE
    return ProfileSet(load_latency_profile(latency_path), load_quality_profile(quality_path),
                      f"{latency_path}, {quality_path}")
