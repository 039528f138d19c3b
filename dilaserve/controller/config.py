"""The controller's settings: validated once at the edge (pydantic), a frozen dataclass inside.

Every duration is in seconds, rates in requests/s, ``quality_budget`` in accuracy points
(1.0 allows 0.01 lower mean accuracy), gains as shares of the traffic (0.02 = 2 points of
SLO attainment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dilaserve.errors import DiLaServeError


class ControllerConfigError(DiLaServeError):
    """Controller settings are invalid."""


@dataclass(frozen=True)
class ControllerConfig:
    gpus: int  # devices the plan may use (on CPU: degree-1 replica slots)
    model: str | None = None  # the served model it manages (None: the config's first)
    slo_scale: float | None = None  # None: the serving config's slo.slo_scale
    quality_budget: float = 1.0  # accuracy points
    profiles_dir: str | None = None  # latency.json + quality.json; None: the planner's defaults
    solver: str = "auto"
    # When to look and when to re-plan
    tick_s: float = 2.0  # observe this often
    window_s: float = 30.0  # arrival rate and SLO attainment over this window
    period_s: float = 30.0  # re-plan at least this often
    rate_change: float = 0.25  # ... or sooner when the rate moves by this share since the last plan
    attainment_target: float = 0.9  # ... or when the window's SLO attainment falls below this
    length_statistic: str = "p90"  # of recent (prompt, output) lengths: mean, work or pNN (planner/workload.py)
    # Closing the loop on the model: when the running replicas miss the SLO the profiles say
    # they meet, plan with capacities scaled down (see decision.corrected_capacity)
    utilization: float = 0.9  # the planner's share of an instance's SLO capacity to load it to
    min_capacity_factor: float = 0.25  # the correction never scales capacities below this
    min_window_requests: int = 20  # ended requests a window needs before attainment counts
    # Hysteresis: when a new plan is worth applying (planner.replan_reason)
    min_gain: float = 0.02
    min_gpus_freed: int = 1
    min_accuracy_gain: float = 0.005
    min_interval_s: float = 60.0  # between two reconfigurations (unless the new one serves more)
    headroom: float = 0.2  # a smaller cluster is planned for rate x (1 + headroom)
    min_replicas: int = 1  # warm replicas kept even without traffic
    # A dedicated cluster: a plan on fewer than ``gpus`` GPUs is topped up with replicas of its
    # most accurate setting at its smallest degree, so spare GPUs add headroom instead of idling
    keep_gpus: bool = False
    # Applying a plan
    start_timeout_s: float = 900.0  # a new replica not ready by then is removed, the old plan stays
    drain_timeout_s: float = 120.0  # one tick's wait for in-flight requests (then it waits again)


class ControllerSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: int = Field(ge=1)
    model: str | None = None
    slo_scale: float | None = Field(None, gt=0)
    quality_budget: float = Field(1.0, ge=0)
    profiles_dir: str | None = None
    solver: Literal["auto", "cbc", "highs"] = "auto"
    tick_s: float = Field(2.0, gt=0)
    window_s: float = Field(30.0, gt=0)
    period_s: float = Field(30.0, gt=0)
    rate_change: float = Field(0.25, gt=0)
    attainment_target: float = Field(0.9, ge=0, le=1)
    length_statistic: str = Field("p90", pattern=r"^(mean|work|p(100|\d{1,2}(\.\d+)?))$")
    utilization: float = Field(0.9, gt=0, le=1)
    min_capacity_factor: float = Field(0.25, gt=0, le=1)
    min_window_requests: int = Field(20, ge=1)
    min_gain: float = Field(0.02, ge=0, le=1)
    min_gpus_freed: int = Field(1, ge=1)
    min_accuracy_gain: float = Field(0.005, ge=0)
    min_interval_s: float = Field(60.0, ge=0)
    headroom: float = Field(0.2, ge=0)
    min_replicas: int = Field(1, ge=0)
    keep_gpus: bool = False
    start_timeout_s: float = Field(900.0, gt=0)
    drain_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ControllerSection":
        if self.window_s < self.tick_s:
            raise ValueError(f"window_s ({self.window_s}) must be at least tick_s ({self.tick_s})")
        return self


def parse_controller_config(data: Mapping[str, Any], where: str = "controller config") -> ControllerConfig:
    try:
        return ControllerConfig(**ControllerSection.model_validate(dict(data)).model_dump())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
        )
        raise ControllerConfigError(f"{where}: {problems}") from None
