"""Deadlines and admission. Pure logic (no Ray, no torch).

Every request gets a deadline at the ingress: its own (``deadline_ms``), else one built from
TTFT / TPOT targets (its own or the configured defaults), else ``slo_scale`` x its predicted
solo latency. It is admitted when some replica is predicted to finish it in time at its
quality floor; otherwise it is refused at once (HTTP 429 with Retry-After) unless it asked for
best effort or admission control is off (a baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SLOTargets:
    """What one request asked for, in seconds (None: not given)."""

    deadline_s: float | None = None  # end-to-end budget from arrival
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class SLODefaults:
    slo_scale: float = 5.0
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class Deadline:
    budget_s: float  # seconds from arrival until the last token is due
    ttft_s: float | None  # first-token target, when one applies
    tpot_s: float | None  # mean inter-token target after the first, when one applies
    source: str  # "request", "ttft_tpot" or "slo_scale": where the budget came from


def assign_deadline(targets: SLOTargets, defaults: SLODefaults, solo_s: float, num_output_tokens: int) -> Deadline:
    ttft = targets.ttft_s if targets.ttft_s is not None else defaults.ttft_s
    tpot = targets.tpot_s if targets.tpot_s is not None else defaults.tpot_s
    if targets.deadline_s is not None:
        return Deadline(targets.deadline_s, ttft, tpot, "request")
    if ttft is not None and tpot is not None:
        return Deadline(ttft + tpot * max(0, num_output_tokens - 1), ttft, tpot, "ttft_tpot")
    return Deadline(defaults.slo_scale * solo_s, ttft, tpot, "slo_scale")


@dataclass(frozen=True)
class Prediction:
    """One replica's predictions for the request at its quality floor (seconds from now)."""

    finish_s: float  # queueing included
    solo_s: float  # alone on the replica


@dataclass(frozen=True)
class Decision:
    is_admitted: bool
    retry_after_s: int = 0  # whole seconds, for the Retry-After header of a refusal
    reason: str = ""


def decide(
    budget_s: float, predictions: Sequence[Prediction], *, is_enabled: bool = True, is_best_effort: bool = False,
) -> Decision:
    """Admit when some replica is predicted to finish within ``budget_s`` (seconds left until
    the deadline)."""
    if not is_enabled:
        return Decision(True, reason="admission control is off")
    if is_best_effort:
        return Decision(True, reason="best effort")
    if not predictions:
        return Decision(False, 1, "no replica is available")
    best = min(p.finish_s for p in predictions)
    if best <= budget_s:
        return Decision(True, reason=f"predicted finish {best:.3f}s within {budget_s:.3f}s")
    fastest_solo = min(p.solo_s for p in predictions)
    if fastest_solo > budget_s:
        reason = (f"the deadline ({max(0.0, budget_s) * 1e3:.0f} ms left) cannot be met even on an idle "
                  f"replica (predicted {fastest_solo * 1e3:.0f} ms at the quality floor)")
    else:
        reason = (f"no replica can finish before the deadline ({max(0.0, budget_s) * 1e3:.0f} ms left): the "
                  f"earliest predicted finish is in {best * 1e3:.0f} ms")
    # After roughly the excess, enough queued work has drained for the same request to fit.
    return Decision(False, max(1, math.ceil(best - budget_s)), reason)


def refusal_message(reason: str) -> str:
    """The message of a 429 for a deadline that cannot be met, with what the client can do."""
    return f"request refused: {reason}; retry later, relax the deadline, lower quality_floor, or set best_effort"


SQUEEZE_REASON = "admitting it would make requests already admitted miss their deadlines"


def is_slo_met(deadline: Deadline, e2e_s: float, ttft_s: float | None, tpot_s: float | None) -> bool:
    """Met when the response ended within budget and hit any TTFT / TPOT target that applies."""
    if e2e_s > deadline.budget_s:
        return False
    if deadline.ttft_s is not None and ttft_s is not None and ttft_s > deadline.ttft_s:
        return False
    if deadline.tpot_s is not None and tpot_s is not None and tpot_s > deadline.tpot_s:
        return False
    return True
