"""The serving configuration: what users write in YAML, validated once, then plain dataclasses.

A config names the models, the variants that serve them (parallelism degree, replicas,
resources, engine settings), the SLO defaults, the routing and admission policies and the
HTTP front door. ``load_config(path)`` reads and validates a YAML file; ``default_config()``
is what ``dilaserve serve`` runs without ``--config``: the embedded default model on one CPU
replica at 127.0.0.1:8000.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dilaserve.errors import DiLaServeError
from dilaserve.models.store import DEFAULT_MODEL_NAME
ROUTING_POLICIES = ("slack", "round_robin", "power_of_two")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ConfigError(DiLaServeError):
    """A serving config file is missing, unreadable or invalid."""


# -- the inside: plain frozen dataclasses ------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    name: str  # the "model" field clients send
    path: str | None  # model directory; None: the embedded model of this name
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class VariantConfig:
    """One Serve deployment per replica of this variant; all replicas alike."""

    name: str
    model: str
    tensor_parallel: int = 1
    num_replicas: int = 1
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 1024  # concurrent requests Serve lets through to one replica
    threshold: float | None = None  # initial default threshold (None: the engine's own)
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineConfig fields
    # Initial sparse-KV retention for requests that leave kv_retention unset, where sparse KV is
    # valid (dual cache, bidirectional model); None: dense. The controller changes it live.
    kv_retention: float | None = None


@dataclass(frozen=True)
class SLOConfig:
    slo_scale: float = 5.0  # deadline = slo_scale x predicted solo latency, unless set
    ttft_ms: float | None = None  # default TTFT target (ms) when a request sets none
    tpot_ms: float | None = None  # default mean time per output token after the first (ms)
    quality_floor: float | None = None  # default lowest threshold a request accepts
    # Time outside the engine (HTTP, Serve hops, tokenization), added to every engine
    # prediction: it dominates on a small CPU model, and is noise on a large GPU one.
    overhead_ms: float = 50.0


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "slack"
    seed: int = 0  # power-of-two sampling
    estimate_timeout_ms: float = 2000.0  # a replica slower than this to answer is skipped


@dataclass(frozen=True)
class AdmissionConfig:
    enabled: bool = True
    max_waiting: int | None = None  # queued requests per replica before 429 (None: unbounded)
    # Share of each deadline kept in reserve for prediction error: a request is admitted when
    # predicted to finish within (1 - headroom) x its time left, and when no admitted request
    # would then be predicted past (1 - headroom) x its own. Predictions are scaled by the
    # replica's measured error (EngineCore.prediction_scale, its 95th percentile): for the
    # newcomer the margin is the larger of the two, for requests already admitted their
    # product (EngineCore.predict_min_slack_s). Config files default to 0.2.
    headroom: float = 0.0


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1 << 20  # larger request bodies are refused with 413
    max_prompt_tokens: int | None = None  # longer prompts are refused with 400 (None: the model's limit)
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    ingress_num_cpus: float = 0.5


@dataclass(frozen=True)
class RequestDefaults:
    """Sampling defaults for fields a request leaves out (lengths in tokens)."""

    max_tokens: int = 128
    block_length: int = 32
    temperature: float = 0.0
    cache: str = "dual"
    kv_retention: float | None = None  # head-centric sparse KV for requests that do not say (dual cache)


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[ModelConfig, ...]
    variants: tuple[VariantConfig, ...]
    slo: SLOConfig = SLOConfig()
    routing: RoutingConfig = RoutingConfig()
    admission: AdmissionConfig = AdmissionConfig()
    http: HttpConfig = HttpConfig()
    defaults: RequestDefaults = RequestDefaults()
    app_name: str = "dilaserve"

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    def replica_names(self) -> list[tuple[str, VariantConfig]]:
        """One Serve deployment per replica: ``<variant>-<index>``."""
        return [(f"{v.name}-{i}", v) for v in self.variants for i in range(v.num_replicas)]


# -- the edge: pydantic models of the YAML ----------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(_Section):
    name: str = Field(min_length=1, max_length=128, pattern=_NAME)
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"


class EngineSection(_Section):
    """A variant's engine settings (``EngineConfig`` fields), checked here so that a bad value
    is a config error at start, not a replica that fails to construct. Only the settings
    written are passed on; the rest keep EngineConfig's defaults."""

    max_batch_tokens: int = Field(8192, ge=1)
    max_refresh_tokens: int = Field(4096, ge=1)
    max_running: int = Field(256, ge=1)
    max_waiting: int = Field(4096, ge=0)
    page_size: int = Field(16, ge=1)
    num_pages: int | None = Field(None, ge=1)
    kv_memory_gib: float = Field(1.0, gt=0)
    refresh_bound: Literal["fixed", "auto"] = "fixed"
    refresh_slowdown: float = Field(1.0, ge=0)
    step_memory_gib: float | None = Field(None, gt=0)
    chunk_control: Literal["fixed", "adaptive"] = "fixed"
    latency_profile: str | None = Field(None, min_length=1)
    acceptance_profile: str | None = Field(None, min_length=1)
    default_threshold: float = Field(0.9, gt=0, le=1)
    threshold_step: float = Field(0.1, gt=0, lt=1)
    load_control: bool = False
    kernels: Literal["auto", "torch", "triton"] = "auto"
    cuda_graphs: bool = True
    sparse_scratch_tokens: int = Field(0, ge=0)
    quality_profile: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            if "tensor_parallel" in data:
                raise ValueError("set tensor_parallel on the variant, not in its engine settings")
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(cls.model_fields)}")
        return data


class VariantSection(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=_NAME)
    model: str
    tensor_parallel: Literal[1, 2, 4, 8] = 1
    num_replicas: int = Field(1, ge=0, le=1024)
    num_gpus_per_replica: float | None = Field(None, ge=0)  # default: tensor_parallel on cuda, 0 on cpu
    num_cpus_per_replica: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    threshold: float | None = Field(None, gt=0, le=1)
    engine: EngineSection = Field(default_factory=EngineSection)
    kv_retention: float | None = Field(None, gt=0, le=1)


class SLOSection(_Section):
    slo_scale: float = Field(5.0, gt=0)
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    quality_floor: float | None = Field(None, gt=0, le=1)
    overhead_ms: float = Field(50.0, ge=0)


class RoutingSection(_Section):
    policy: Literal["slack", "round_robin", "power_of_two"] = "slack"
    seed: int = 0
    estimate_timeout_ms: float = Field(2000.0, gt=0)


class AdmissionSection(_Section):
    enabled: bool = True
    max_waiting: int | None = Field(None, ge=0)
    headroom: float = Field(0.2, ge=0, lt=1)


class HttpSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    api_key: str | None = Field(None, min_length=1)
    ingress_num_cpus: float = Field(0.5, ge=0)


class DefaultsSection(_Section):
    max_tokens: int = Field(128, ge=1)
    block_length: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0)
    cache: Literal["none", "prefix", "dual"] = "dual"
    kv_retention: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _sparse_needs_dual(self) -> "DefaultsSection":
        if self.kv_retention is not None and self.cache != "dual":
            raise ValueError("defaults.kv_retention needs defaults.cache 'dual'")
        return self


class ServeConfigFile(_Section):
    app_name: str = Field("dilaserve", pattern=_NAME)
    models: list[ModelSection] = Field(min_length=1)
    variants: list[VariantSection] = Field(min_length=1)
    slo: SLOSection = SLOSection()
    routing: RoutingSection = RoutingSection()
    admission: AdmissionSection = AdmissionSection()
    http: HttpSection = HttpSection()
    defaults: DefaultsSection = DefaultsSection()

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfigFile":
        for what, names in (("model", [m.name for m in self.models]), ("variant", [v.name for v in self.variants])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {dupes}")
        models = {m.name: m for m in self.models}
        for v in self.variants:
            if v.model not in models:
                raise ValueError(
                    f"variant {v.name!r} serves model {v.model!r}, which is not among models {sorted(models)}"
                )
            gpus = v.num_gpus_per_replica
            if v.tensor_parallel > 1 and models[v.model].device == "cuda" and gpus is not None and gpus < v.tensor_parallel:
                raise ValueError(f"variant {v.name!r}: tensor_parallel {v.tensor_parallel} needs "
                                 f"{v.tensor_parallel} GPUs per replica (one a rank), not {gpus}")
        served = {v.model for v in self.variants if v.num_replicas > 0}
        idle = sorted(set(models) - served)
        if idle:
            raise ValueError(f"model(s) {idle} have no variant with num_replicas >= 1")
        return self

    def to_config(self) -> ServeConfig:
        models = {m.name: m for m in self.models}
        return ServeConfig(
            models=tuple(ModelConfig(**m.model_dump()) for m in self.models),
            variants=tuple(_variant(v, models[v.model]) for v in self.variants),
            slo=SLOConfig(**self.slo.model_dump()),
            routing=RoutingConfig(**self.routing.model_dump()),
            admission=AdmissionConfig(**self.admission.model_dump()),
            http=HttpConfig(**self.http.model_dump()),
            defaults=RequestDefaults(**self.defaults.model_dump()),
            app_name=self.app_name,
        )


def _variant(v: VariantSection, model: ModelSection) -> VariantConfig:
    fields = v.model_dump()
    fields["engine"] = v.engine.model_dump(exclude_unset=True)
    if fields["num_gpus_per_replica"] is None:
        fields["num_gpus_per_replica"] = float(v.tensor_parallel) if model.device == "cuda" else 0.0
    return VariantConfig(**fields)


# -- entry points -------------------------------------------------------------------------------
def parse_config(data: Mapping[str, Any], where: str = "config") -> ServeConfig:
    """Validates a config given as a mapping (a parsed YAML file, or Serve builder args)."""
    try:
        return ServeConfigFile.model_validate(dict(data)).to_config()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: invalid serving config: {problems}") from None


def load_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the serving config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the serving config must be a YAML mapping")
    return parse_config(data, str(path))


def default_config(model_path: str | None = None, host: str | None = None, port: int | None = None) -> ServeConfig:
    """One CPU replica of the embedded default model, or of the model in ``model_path``, served
    under its directory's name (what ``dilaserve serve [--model DIR]`` runs)."""
    http: dict[str, Any] = {}
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    name = DEFAULT_MODEL_NAME if model_path is None else model_name_for(model_path)
    return parse_config({
        "models": [{"name": name, "path": model_path}],
        "variants": [{"name": "cpu", "model": name, "num_replicas": 1}],
        "http": http,
    }, "default config")


def model_name_for(model_path: str) -> str:
    """The name clients send for a model directory: its last path part, made a valid name."""
    base = Path(model_path).expanduser().resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("._-")[:128]
    return name or "model"


def with_http(config: ServeConfig, host: str | None = None, port: int | None = None,
              api_key: str | None = None) -> ServeConfig:
    """The config with its HTTP host / port / API key overridden (command-line flags and the
    environment win over the file)."""
    if api_key is not None and not api_key:
        raise ConfigError("the API key must not be empty")
    changes = {k: v for k, v in (("host", host), ("port", port), ("api_key", api_key)) if v is not None}
    return dataclasses.replace(config, http=dataclasses.replace(config.http, **changes)) if changes else config
