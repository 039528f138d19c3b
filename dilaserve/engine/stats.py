"""Load statistics an engine reports to the serving layer (for routing and admission)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    tokens_in_flight: int  # positions still to decide over all admitted requests
    pages_free: int
    pages_total: int
    steps_per_s: float  # recent engine steps per second
    tokens_decided_per_step: float  # recent mean over requests and steps
    # Predicted seconds to finish everything queued and running, from the cost model.
    predicted_backlog_s: float
    threshold_default: float | None = None
    num_finished: int = 0
    num_threshold_lowerings: int = 0
    mean_chunk_size: float = 0.0  # positions queried per request and step, recently
    # The cost model's current StepCost as (fixed_s, per_token_s, per_context_s): fitted
    # online from this engine's steps, or its prior (what the simulator needs to mirror it).
    step_cost: tuple[float, float, float] | None = None
    # The factor admission multiplies its finish predictions by (EngineCore.prediction_scale).
    prediction_scale: float = 1.0
