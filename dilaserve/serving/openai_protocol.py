"""OpenAI-compatible request bodies, their mapping to engine settings, and API errors.

Bodies are validated strictly (no silent "5" -> 5 coercion, unknown fields refused) so a typo
in a DiLaServe field (``treshold``) is an error, not a default. OpenAI fields that DiLaServe
does not implement are accepted only at their neutral values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dilaserve.engine.sampling_params import SamplingParams, default_cache
from dilaserve.errors import InvalidRequestError
from dilaserve.serving.admission import SLOTargets
from dilaserve.serving.config import RequestDefaults

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN, Infinity: 400s


class StreamOptions(StrictBody):
    include_usage: bool = False


class _GenerationRequest(StrictBody):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # Accepted at their neutral values only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # DiLaServe's decoding fields.
    threshold: float | None = Field(None, gt=0, le=1)  # confidence threshold for parallel decoding
    block_length: int | None = Field(None, ge=1)  # tokens per semi-autoregressive block
    steps: int | None = Field(None, ge=1)  # fixed-steps schedule (forwards over all blocks)
    chunk_size: int | None = Field(None, ge=1)  # positions queried per step (fixed)
    min_chunk: int | None = Field(None, ge=1)
    max_chunk: int | None = Field(None, ge=1)
    cache: Literal["none", "prefix", "dual"] | None = None
    kv_retention: float | None = Field(None, gt=0, le=1)  # head-centric sparse KV (dual cache)
    # DiLaServe's service-level fields.
    deadline_ms: float | None = Field(None, gt=0)  # end-to-end, from arrival
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    quality_floor: float | None = Field(None, gt=0, le=1)  # lowest threshold the request accepts
    best_effort: bool = False  # serve even when the deadline looks unattainable

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stop

    @model_validator(mode="after")
    def _neutral_unsupported(self):
        if self.n != 1:
            raise ValueError("only n = 1 is supported")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.quality_floor is not None and self.threshold is not None and self.quality_floor > self.threshold:
            raise ValueError(f"quality_floor ({self.quality_floor}) must not exceed threshold ({self.threshold})")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            return prompt[0]
        if isinstance(prompt, list):
            if any(isinstance(p, list) for p in prompt):
                raise ValueError("batched prompts are not supported: send one prompt per request")
            if any(isinstance(p, bool) or not isinstance(p, int) for p in prompt):
                raise ValueError("prompt must be a string or a list of integer token ids")
        elif not isinstance(prompt, str):
            raise ValueError("prompt must be a string or a list of integer token ids")
        return prompt

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("only best_of = 1 is supported")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        return self


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    # Fields client libraries send with their defaults: accepted at neutral values, refused with
    # a reason otherwise (not as unknown fields).
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # tags for stored completions; nothing is stored
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # a cache hint; ignored
    safety_identifier: str | None = None  # an end-user id, like ``user``; ignored

    @model_validator(mode="after")
    def _chat_unsupported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {\"type\": \"text\"} is supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: tools are not supported (only \"none\" or \"auto\" without tools)")
        if self.modalities not in (None, ["text"]):
            raise ValueError("modalities: only [\"text\"] is supported")
        if self.store:
            raise ValueError("store is not supported: completions are not stored")
        if self.service_tier not in (None, "auto", "default"):
            raise ValueError("service_tier: only \"auto\" or \"default\"")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(model: type[StrictBody], body: bytes) -> Any:
    """Validates a JSON body; every problem becomes a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise invalid(f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}") from None
        if err["type"] == "model_type":
            raise invalid("the request body must be a JSON object") from None
        param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "this field is required"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise invalid(f"{param or 'body'}: {msg}", param or None) from None


def _is_type_tag(loc_part) -> bool:
    # Union members show up in error locations ("stop.list[str].0"); they are not fields.
    return isinstance(loc_part, str) and ("[" in loc_part or loc_part in ("str", "int", "float", "bool"))


def resolve_max_tokens(requested: int | None, default: int, prompt_len: int, max_positions: int) -> int:
    """Generated positions for a request; an explicit value must fit the model."""
    room = max_positions - prompt_len
    if requested is not None:
        if requested > room:
            raise invalid(
                f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds the model's maximum of "
                f"{max_positions} positions", "max_tokens",
            )
        return requested
    if room < 1:
        raise invalid(f"the prompt ({prompt_len} tokens) leaves no room in the model's {max_positions} positions",
                      "prompt")
    return min(default, room)


def model_defaults(defaults: RequestDefaults, spec) -> RequestDefaults:
    """The sampling defaults for one model: a block-causal model (SDAR) decodes its own blocks
    with the exact cache, whatever the server-wide block length and cache mode say."""
    if not spec.causal_block_size:
        return defaults
    return dataclasses.replace(defaults, block_length=spec.causal_block_size,
                               cache=default_cache(spec.causal_block_size), kv_retention=None)


def to_sampling_params(
    req: _GenerationRequest, defaults: RequestDefaults, *, max_tokens: int, default_floor: float | None = None,
    stop_token_ids: tuple[int, ...] = (),
) -> SamplingParams:
    """Engine settings for a request. ``threshold`` stays None when the request sets none: the
    replica fills in its current default (which the controller may change live)."""
    block = req.block_length if req.block_length is not None else defaults.block_length
    floor = req.quality_floor if req.quality_floor is not None else default_floor
    if floor is not None and req.threshold is not None:
        floor = min(floor, req.threshold)  # a configured default never overrides an explicit threshold
    params = SamplingParams(
        max_tokens=max_tokens,
        block_size=block,
        threshold=None if req.steps is not None else req.threshold,
        steps=req.steps,
        temperature=req.temperature if req.temperature is not None else defaults.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        chunk_size=req.chunk_size,
        min_chunk=req.min_chunk if req.min_chunk is not None else 1,
        max_chunk=req.max_chunk,
        cache=req.cache or defaults.cache,
        stop=req.stop_strings,
        stop_token_ids=tuple(stop_token_ids) + tuple(req.stop_token_ids or ()),
        seed=req.seed,
        threshold_floor=None if req.steps is not None else floor,
        # A request that picks its own cache mode leaves the sparse-KV default out.
        kv_retention=req.kv_retention if req.kv_retention is not None or req.cache else defaults.kv_retention,
    )
    check_params(params)
    return params


def with_replica_defaults(params: SamplingParams, threshold: float, kv_retention: float | None,
                          is_block_causal: bool) -> SamplingParams:
    """``params`` with a replica's defaults filled in: ``threshold`` where the request asked for
    none (raised to its quality floor), and sparse KV at ``kv_retention`` where the request
    left it unset and it is valid: the dual cache without refresh interval, on a bidirectional
    model. A request's own retention is kept; a request on another cache mode, or on a
    block-causal model, stays dense."""
    changes: dict[str, Any] = {}
    if params.steps is None and params.threshold is None:
        changes["threshold"] = max(threshold, params.threshold_floor or 0.0)
    if (kv_retention is not None and params.kv_retention is None and params.cache == "dual"
            and not params.refresh_interval and not is_block_causal):
        changes["kv_retention"] = kv_retention
    return dataclasses.replace(params, **changes) if changes else params


def check_params(params: SamplingParams) -> None:
    """The engine's own validation, as a 400 (a placeholder stands in for a default threshold)."""
    probe = params
    if params.steps is None and params.threshold is None:
        probe = dataclasses.replace(params, threshold=params.threshold_floor or 1.0)
    try:
        probe.validate()
    except InvalidRequestError as exc:
        raise invalid(str(exc)) from None


def slo_targets(req: _GenerationRequest) -> SLOTargets:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1e3

    return SLOTargets(seconds(req.deadline_ms), seconds(req.ttft_ms), seconds(req.tpot_ms))
