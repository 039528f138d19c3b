"""Open-loop replay of a trace against an OpenAI-compatible endpoint.

Each request is sent at its trace time, whatever happened to earlier ones (open loop: a slow
server does not slow the arrivals down), as a streaming ``POST {endpoint}/v1/completions``
(or ``/v1/chat/completions``) with ``max_tokens`` set to the trace's output length and, when
there is a baseline, a ``deadline_ms`` field: the request's remaining budget when it is sent.
The first non-empty text delta is its first token. HTTP 429 is a refusal (its Retry-After is
kept, the request is not retried); a broken stream or other HTTP error is an error; a request
still running after ``request_timeout_s`` is a timeout.

Optional server extensions read from stream chunks: ``usage.completion_tokens`` (tokens
received; otherwise the number of non-empty deltas) and a ``dilaserve`` object with
``threshold`` and ``chunk_size`` (the last values seen are recorded).

Prompts are built, and deadlines computed, before the clock starts, so building them does not
perturb the arrival times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Mapping, Sequence

import httpx

from dilaserve.errors import DiLaServeError, InvalidRequestError
from dilaserve.replay.prompts import PromptBuilder, Scorer
from dilaserve.replay.records import RequestRecord, Status
from dilaserve.replay.slo import BaselineLatency, LinearLatency, deadline_s, fit_linear_latency
from dilaserve.replay.trace import Trace

log = logging.getLogger(__name__)


class ReplayError(DiLaServeError):
    """A replay cannot go on: for example no calibration request completed."""


@dataclass(frozen=True)
class ReplayConfig:
    endpoint: str  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str | None = None  # None: the first model /v1/models lists
    api: Literal["completions", "chat"] = "completions"
    system: str = "dilaserve"  # name written into every record
    slo_scale: float = 5.0  # deadline = slo_scale x baseline latency
    send_deadline: bool = True  # send deadline_ms in the request body
    max_in_flight: int = 1024  # guard on open requests; arrivals past it wait (and it shows in latency)
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    temperature: float = 0.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    seed: int = 0  # prompt building

    @property
    def base_url(self) -> str:
        url = self.endpoint.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class PreparedRequest:
    request_id: int
    arrival_s: float
    prompt: str
    prompt_tokens: int
    max_tokens: int
    deadline_s: float | None
    scorer: Scorer | None = None


def prepare_requests(
    trace: Trace, prompt_builder: PromptBuilder, *, baseline: BaselineLatency | None = None,
    slo_scale: float = 5.0, seed: int = 0,
) -> list[PreparedRequest]:
    """Prompts and deadlines for every request of ``trace``, deterministic in ``seed``."""
    rng = random.Random(seed)
    prepared = []
    for i, r in enumerate(trace):
        prompt, scorer = prompt_builder.build(r.prompt_tokens, rng)
        max_tokens = max(1, r.output_tokens)
        prepared.append(PreparedRequest(i, r.arrival_s, prompt, r.prompt_tokens, max_tokens,
                                        deadline_s(baseline, slo_scale, r.prompt_tokens, max_tokens), scorer))
    return prepared


# -- one request ---------------------------------------------------------------------------
@dataclass
class _Progress:
    """What is known of a request so far; read back when it times out."""

    send_s: float | None = None
    first_token_s: float | None = None
    num_deltas: int = 0
    usage_tokens: int | None = None
    threshold: float | None = None
    chunk_size: float | None = None
    parts: list[str] = field(default_factory=list)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _delta_text(chunk: dict, api: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if api == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class _Sender:
    def __init__(self, config: ReplayConfig, client: httpx.AsyncClient, model: str, t0: float):
        self.config = config
        self.client = client
        self.model = model
        self.t0 = t0
        path = "/v1/chat/completions" if config.api == "chat" else "/v1/completions"
        self.url = config.base_url + path

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def body(self, request: PreparedRequest, send_s: float, send_deadline: bool) -> dict:
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True},
                                "temperature": self.config.temperature}
        if self.config.api == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if send_deadline and request.deadline_s is not None:
            remaining_s = request.deadline_s - (send_s - request.arrival_s)
            # Already late (held back by the in-flight guard): 1 ms, so the server can refuse it.
            body["deadline_ms"] = max(1.0, round(1000 * remaining_s, 3))
        body.update(self.config.extra_body)
        return body

    async def send(self, request: PreparedRequest, progress: _Progress, *, send_deadline: bool) -> RequestRecord:
        """Stream one request to the end; raises only ``asyncio.CancelledError``."""
        progress.send_s = self.now()
        body = self.body(request, progress.send_s, send_deadline)
        try:
            async with self.client.stream("POST", self.url, json=body) as response:
                if response.status_code == 429:  # refused: keep the server's reason with the record
                    reason = (await response.aread()).decode(errors="replace")[:300]
                    return self.record(request, progress, Status.REFUSED, http_status=429,
                                       retry_after_s=_retry_after_s(response.headers.get("retry-after")),
                                       error=f"HTTP 429: {reason}")
                if response.status_code >= 400:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    return self.record(request, progress, Status.ERROR, http_status=response.status_code,
                                       error=f"HTTP {response.status_code}: {text}")
                error = await self._read_stream(response, progress)
                status = Status.ERROR if error else Status.OK
                return self.record(request, progress, status, http_status=response.status_code, error=error)
        except httpx.HTTPError as exc:
            return self.record(request, progress, Status.ERROR, error=f"{type(exc).__name__}: {exc}"[:300])

    async def _read_stream(self, response: httpx.Response, progress: _Progress) -> str | None:
        """Consume server-sent events; the error message if the stream is not a clean answer."""
        is_done = False
        async for line in response.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                is_done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                return f"bad event data: {data[:100]!r}"
            if not isinstance(chunk, dict):
                return f"bad event data: {data[:100]!r}"
            if chunk.get("error"):
                return f"error event: {json.dumps(chunk['error'])[:200]}"
            text = _delta_text(chunk, self.config.api)
            if text:
                if progress.first_token_s is None:
                    progress.first_token_s = self.now()
                progress.num_deltas += 1
                progress.parts.append(text)
            usage = chunk.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                progress.usage_tokens = usage["completion_tokens"]
            extension = chunk.get("dilaserve")
            if isinstance(extension, dict):
                if isinstance(extension.get("threshold"), (int, float)):
                    progress.threshold = float(extension["threshold"])
                size = extension.get("chunk_size")
                if isinstance(size, (int, float)) and not isinstance(size, bool):
                    progress.chunk_size = float(size)
        return None if is_done else "stream ended before [DONE]"

    def record(self, request: PreparedRequest, progress: _Progress, status: Status, *,
               http_status: int | None = None, retry_after_s: float | None = None,
               error: str | None = None) -> RequestRecord:
        received = progress.usage_tokens if progress.usage_tokens is not None else progress.num_deltas
        correct = None
        if status is Status.OK and request.scorer is not None:
            try:
                correct = bool(request.scorer("".join(progress.parts)))
            except Exception as exc:  # a scorer bug must not lose the run
                log.warning("scorer failed on request %d: %s", request.request_id, exc)
        return RequestRecord(
            request_id=request.request_id, arrival_s=request.arrival_s, send_s=progress.send_s,
            first_token_s=progress.first_token_s, finish_s=self.now(), prompt_tokens=request.prompt_tokens,
            output_tokens_requested=request.max_tokens, output_tokens_received=received, status=status,
            system=self.config.system, http_status=http_status, deadline_s=request.deadline_s,
            retry_after_s=retry_after_s, correct=correct, threshold_used=progress.threshold,
            chunk_size=progress.chunk_size, error=error,
        )

    async def send_with_timeout(self, request: PreparedRequest, *, send_deadline: bool) -> RequestRecord:
        progress = _Progress()
        try:
            return await asyncio.wait_for(self.send(request, progress, send_deadline=send_deadline),
                                          self.config.request_timeout_s)
        except asyncio.TimeoutError:
            return self.record(request, progress, Status.TIMEOUT,
                               error=f"no complete answer after {self.config.request_timeout_s:g} s")


# -- the replay ----------------------------------------------------------------------------
def _make_client(config: ReplayConfig) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=config.max_in_flight, max_keepalive_connections=config.max_in_flight)
    timeout = httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


def check_endpoint(config: ReplayConfig) -> None:
    """Fails at once (``InvalidRequestError``) where ``config.endpoint`` is no URL or nothing
    accepts a connection there, instead of recording every request of the trace as an error.
    Any HTTP answer, even an error status, counts as reachable."""
    try:
        with httpx.Client(trust_env=False, timeout=httpx.Timeout(30.0, connect=config.connect_timeout_s)) as client:
            client.get(config.base_url + "/v1/models")
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise InvalidRequestError(f"--endpoint {config.endpoint!r} is not an http(s) URL: {exc}") from None
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise InvalidRequestError(f"cannot connect to --endpoint {config.endpoint} ({exc}); is the server "
                                  "running there?") from None


async def resolve_model(config: ReplayConfig, client: httpx.AsyncClient) -> str:
    """``config.model``, or the first model the endpoint lists (``default`` if it lists none)."""
    if config.model:
        return config.model
    try:
        response = await client.get(config.base_url + "/v1/models", timeout=config.connect_timeout_s)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        log.warning("could not list models at %s (%s); sending model 'default'", config.base_url, exc)
        return "default"


async def replay_async(
    trace: Trace, config: ReplayConfig, prompt_builder: PromptBuilder, *,
    baseline: BaselineLatency | None = None, client: httpx.AsyncClient | None = None,
) -> list[RequestRecord]:
    """Replay ``trace`` open-loop; one record per request, in trace order."""
    prepared = prepare_requests(trace, prompt_builder, baseline=baseline, slo_scale=config.slo_scale,
                                seed=config.seed)
    return await replay_prepared(prepared, config, client=client)


async def replay_prepared(
    prepared: Sequence[PreparedRequest], config: ReplayConfig, *, client: httpx.AsyncClient | None = None,
) -> list[RequestRecord]:
    from tqdm.auto import tqdm

    owns_client = client is None
    client = client or _make_client(config)
    try:
        model = await resolve_model(config, client)
        guard = asyncio.Semaphore(config.max_in_flight)
        bar = tqdm(total=len(prepared), unit="req", desc=config.system, disable=not config.show_progress)
        counts = {s: 0 for s in Status}
        sender = _Sender(config, client, model, t0=time.perf_counter())

        async def one(request: PreparedRequest) -> RequestRecord:
            async with guard:
                record = await sender.send_with_timeout(request, send_deadline=config.send_deadline)
            counts[record.status] += 1
            bar.update(1)
            bar.set_postfix({s.value: counts[s] for s in Status if counts[s]}, refresh=False)
            return record

        tasks = []
        for request in sorted(prepared, key=lambda p: p.arrival_s):
            delay = request.arrival_s - sender.now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        records = await asyncio.gather(*tasks)
        bar.close()
    finally:
        if owns_client:
            await client.aclose()
    return sorted(records, key=lambda r: r.request_id)


def replay(trace: Trace, config: ReplayConfig, prompt_builder: PromptBuilder, *,
           baseline: BaselineLatency | None = None) -> list[RequestRecord]:
    """``replay_async`` from synchronous code."""
    return asyncio.run(replay_async(trace, config, prompt_builder, baseline=baseline))


async def calibrate_baseline(
    config: ReplayConfig, prompt_builder: PromptBuilder, shapes: Sequence[tuple[int, int]], *,
    repeats: int = 1, client: httpx.AsyncClient | None = None,
) -> LinearLatency:
    """Time requests of the given (prompt, output) token shapes one at a time on an idle
    endpoint, without deadlines, and fit a ``LinearLatency`` to their end-to-end times."""
    owns_client = client is None
    client = client or _make_client(config)
    rng = random.Random(config.seed)
    samples: list[tuple[int, int, float]] = []
    try:
        model = await resolve_model(config, client)
        sender = _Sender(config, client, model, t0=time.perf_counter())
        for i, (prompt_tokens, output_tokens) in enumerate(list(shapes) * repeats):
            prompt, _ = prompt_builder.build(prompt_tokens, rng)
            request = PreparedRequest(i, sender.now(), prompt, prompt_tokens, max(1, output_tokens), None)
            record = await sender.send_with_timeout(request, send_deadline=False)
            if record.status is not Status.OK:
                log.warning("calibration request %s failed: %s %s", (prompt_tokens, output_tokens),
                            record.status.value, record.error)
                continue
            samples.append((prompt_tokens, request.max_tokens, record.finish_s - record.send_s))
    finally:
        if owns_client:
            await client.aclose()
    if not samples:
        raise ReplayError(f"no calibration request to {config.base_url} completed: is the endpoint up?")
    return fit_linear_latency(samples)
