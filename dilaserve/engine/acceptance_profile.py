"""Acceptance profiles: how many queried positions a step decides, per chunk and threshold.

A model with random weights (speed work at LLaDA-8B shape) decides nothing meaningful: its
confidences are near uniform, so threshold decoding would commit one position per step. The
load benchmark therefore takes the *number* of positions each step decides from this profile,
measured on a trained model (the embedded one) by ``dilaserve profile acceptance``: the
engine decodes a task's problems at each threshold with a fixed chunk size, and every step is
recorded by its threshold and the number of positions it queried (the chunk, or fewer at a
block's end) as a histogram of how many it decided. It also records, with whole-block query
sets, the commit rate of each position of the query set (position 0 is the block's first
still-masked position).

    {"kind": "acceptance", "model": ..., "task": ..., "block_size": 32, "max_tokens": 64,
     "entries": [{"threshold": 0.9, "queried": 8, "steps": 412, "mean_decided": 2.7,
                  "histogram": [n1, n2, ..., n8]}, ...],             # steps deciding 1..queried
     "position_commit_rate": [{"threshold": 0.9, "rate": [...], "queried": [...]}, ...]}

``AcceptanceProfile`` reads it (torch-free): the mean and a random draw of decided positions
for a threshold (the nearest measured one) and a query-set size (the nearest measured size
not above it, the draw capped at the size).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


class AcceptanceProfile:
    def __init__(self, data: dict[str, Any], source: str = ""):
        self.data = data
        self.source = source
        self.block_size = int(data.get("block_size", 32))
        table: dict[float, dict[int, np.ndarray]] = defaultdict(dict)
        for e in data["entries"]:
            table[round(float(e["threshold"]), 4)][int(e["queried"])] = np.asarray(e["histogram"], dtype=np.float64)
        if not table:
            raise ValueError(f"{source or 'acceptance profile'}: no entries")
        self._thresholds = sorted(table)
        self._table = {t: dict(sorted(rows.items())) for t, rows in table.items()}
        self._means: dict[tuple[float | None, int], float] = {}  # the chunk controller asks every step

    @classmethod
    def load(cls, path: str | Path) -> "AcceptanceProfile":
        return cls(json.loads(Path(path).read_text()), str(path))

    @property
    def name(self) -> str:
        return self.source or f"acceptance_{self.data.get('model', '?')}"

    def _histogram(self, threshold: float | None, queried: int) -> np.ndarray:
        t = 0.9 if threshold is None else threshold
        nearest = min(self._thresholds, key=lambda x: (abs(x - t), -x))
        rows = self._table[nearest]
        sizes = list(rows)
        i = bisect.bisect_right(sizes, queried) - 1
        hist = rows[sizes[max(i, 0)]]
        if queried < len(hist):  # only when no size at or below was measured: fold the tail into the cap
            hist = np.concatenate([hist[:queried - 1], [hist[queried - 1:].sum()]])
        return hist

    def mean(self, threshold: float | None, queried: int) -> float:
        """Mean positions decided by a step querying ``queried`` positions (at least 1)."""
        if queried <= 1:
            return 1.0
        key = (threshold, queried)
        if key not in self._means:
            hist = self._histogram(threshold, queried)
            total = hist.sum()
            self._means[key] = float((np.arange(1, len(hist) + 1) * hist).sum() / total) if total else 1.0
        return self._means[key]

    def draw(self, rng: np.random.Generator, threshold: float | None, queried: int) -> int:
        """Positions one step decides, drawn from the measured histogram: 1..queried."""
        if queried <= 1:
            return 1
        hist = self._histogram(threshold, queried)
        total = hist.sum()
        if not total:
            return 1
        return min(queried, 1 + int(rng.choice(len(hist), p=hist / total)))


# -- measuring ----------------------------------------------------------------------------------
class _RecordingRunner:
    """Wraps an engine's runner; records (queried, decided, committed ranks) of every step item."""

    def __init__(self, inner):
        self.inner = inner
        self.records: list[tuple[int, int, tuple[int, ...]]] = []

    def run(self, plan):
        out = self.inner.run(plan)
        for item in plan.items:
            decided = out.decisions[item.request.request_id].positions
            ranks = tuple(item.query_positions.index(p) for p in decided)
            self.records.append((len(item.query_positions), len(decided), ranks))
        return out

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def measure_acceptance(engine, tokenizer, *, task: str, split: str, num: int, seed: int, max_tokens: int,
                       block_size: int, thresholds: Sequence[float], chunks: Sequence[int], cache: str = "dual",
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Decodes ``num`` problems at every (threshold, chunk) and returns the profile's content."""
    from dilaserve.engine.sampling_params import SamplingParams
    from dilaserve.eval.quality import encode_prompt
    from dilaserve.tasks import get_task

    problems = get_task(task).examples(split, num, seed)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    stop = (eot,) if isinstance(eot, int) and eot >= 0 else ()
    recorder = _RecordingRunner(engine.runner)
    engine.runner = recorder
    hist: dict[tuple[float, int], list[int]] = {}
    commits: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for t in thresholds:
            for chunk in sorted({min(c, block_size) for c in chunks}):
                recorder.records.clear()
                params = SamplingParams(max_tokens=max_tokens, block_size=block_size, threshold=t, chunk_size=chunk,
                                        cache=cache, stop_token_ids=stop)
                for i, prompt in enumerate(prompts):
                    engine.add(engine.make_request(f"acc-{t}-{chunk}-{i}", prompt, params))
                while engine.has_work():
                    engine.step()
                for queried, decided, ranks in recorder.records:
                    row = hist.setdefault((t, queried), [0] * queried)
                    row[decided - 1] += 1
                    if chunk == block_size:
                        committed, asked = commits.setdefault(t, (np.zeros(block_size), np.zeros(block_size)))
                        asked[:queried] += 1
                        committed[list(ranks)] += 1
                steps = len(recorder.records)
                mean = sum(d for _, d, _ in recorder.records) / steps if steps else 0.0
                if progress:
                    progress(f"threshold {t:4.2f} chunk {chunk:3d}: {steps:6d} steps, {mean:5.2f} decided per step")
    finally:
        engine.runner = recorder.inner
    entries = []
    for (t, queried), row in sorted(hist.items()):
        steps = sum(row)
        entries.append({"threshold": t, "queried": queried, "steps": steps,
                        "mean_decided": sum((k + 1) * n for k, n in enumerate(row)) / steps, "histogram": row})
    rates = [{"threshold": t, "rate": [float(c / a) if a else None for c, a in zip(*commits[t])],
              "queried": [int(a) for a in commits[t][1]]} for t in sorted(commits)]
    return {"kind": "acceptance", "task": task, "split": split, "num": num, "block_size": block_size,
            "max_tokens": max_tokens, "cache": cache, "chunks": sorted(set(chunks)), "thresholds": list(thresholds),
            "entries": entries, "position_commit_rate": rates}
