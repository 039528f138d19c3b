"""What crosses the ingress / replica boundary: plain dataclasses, pickled by Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

from dilaserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    # ``params.threshold`` None means "the replica's current default threshold" (which the
    # controller changes live); ``params.threshold_floor`` is the request's quality floor.
    params: SamplingParams
    # Absolute wall-clock deadline (time.time() seconds): it crosses processes and nodes,
    # where monotonic clocks differ. None: no deadline.
    deadline_unix_s: float | None = None
    # False: the client waits for the whole answer, so the replica sends it in one last chunk.
    is_streamed: bool = True
    # The ingress admitted the request on estimates that other admissions may have overtaken;
    # with a check, the replica confirms it against everything it holds at the moment it
    # accepts (None: best effort, or admission off).
    admission: AdmissionCheck | None = None


@dataclass(frozen=True)
class AdmissionCheck:
    """What the replica re-checks when it accepts a request: predicted to finish by
    ``finish_by_unix_s`` (the latest finish the ingress's check allowed: ``(1 - reserve)`` x
    the time left then, less the serving overhead, as a time.time() instant), and no admitted
    request pushed past ``(1 - reserve)`` x its own time left. An absolute instant, because
    the overhead already counts the hop to the replica: measured from arrival again it
    would be paid twice."""

    reserve: float = 0.0
    finish_by_unix_s: float = float("inf")


@dataclass(frozen=True)
class Estimate:
    """One replica's predictions for one prospective request (seconds from now)."""

    replica: str
    solo_s: float  # alone on an idle replica, at the threshold it would run at
    finish_s: float  # added now, queueing included, at that threshold
    finish_at_floor_s: float  # the same at the request's quality floor
    solo_at_floor_s: float
    threshold: float | None  # the threshold it would run at (None: fixed-steps schedule)
    num_waiting: int
    num_running: int
    # The least slack any request admitted there (and on time) would keep if this one were
    # added (at the quality floor); inf: none would be squeezed. Admission needs it >= 0.
    min_slack_s: float = float("inf")
    # False while the replica prices steps from its prior (a fresh replica): see SlackRouter.
    is_calibrated: bool = True


@dataclass
class Chunk:
    """One update of a generation stream from a replica.

    The first chunk of every stream is either an acceptance (``is_accepted``) or an error, so
    the ingress can still answer with a proper HTTP status before it starts streaming.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    is_accepted: bool = False
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    threshold: float | None = None
    kv_retention: float | None = None  # the sparse-KV retention the request runs with (None: dense)
    num_steps: int = 0
    num_tokens_decided: int = 0
    chunk_size: float | None = None  # mean masked positions queried per step
    error: str | None = None
    error_status: int | None = None  # HTTP status the error maps to (400 bad input, 429 full)
    error_code: str | None = None  # the OpenAI error code, where the replica knows it
    retry_after_s: int = 1  # for a 429: when a retry may succeed
