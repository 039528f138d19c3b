"""The HTTP front door: an OpenAI-compatible FastAPI app inside Ray Serve.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` answers with
server-sent events), GET /health, GET /metrics, and two operator endpoints:
GET /v1/dilaserve/replicas (load of every replica) and POST /v1/dilaserve/policy (change the
default threshold / waiting limit of live replicas). Every error is an OpenAI-style body. The
OpenAPI description (request bodies included) is at GET /openapi.json.

A replica that dies under a request: a non-streamed request (or a stream that has sent no token
yet) is sent again to another replica; a stream that has sent tokens ends with an error event.
Admission and routing live in ``Dispatcher`` (see there why routing is done here).
The controller calls four methods through a Serve handle (not HTTP): ``load_report`` (offered
load, SLO outcomes, lengths, the replica set) and ``add_replica`` / ``drain_replica`` /
``remove_replica`` (the replica set, changed live).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from dilaserve.models.spec import ModelSpec
from dilaserve.serving.config import ServeConfig
from dilaserve.serving.dispatcher import Dispatched, Dispatcher, ReplicaRef
from dilaserve.serving.load_counters import LoadCounters
from dilaserve.serving.openai_protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, StrictBody, invalid, model_defaults, parse_body,
    resolve_max_tokens, slo_targets, to_sampling_params,
)
from dilaserve.serving.openai_responses import SSE_DONE, ResponseContext, sse
from dilaserve.serving.progress import ResponseProgress

logger = logging.getLogger(__name__)

app = FastAPI(title="DiLaServe", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
_COUNTED_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
_metrics = None  # IngressMetrics, created inside the Serve replica process
REPLICA_START_TIMEOUT_S = 900.0  # a large model may take minutes to load
MAX_ATTEMPTS = 3  # replicas a request is sent to, when the ones before failed under it


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return _error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


class _CountRequests:
    """Pure ASGI middleware (BaseHTTPMiddleware would get in the way of streaming and of
    cancellation on disconnect): counts requests by endpoint and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = "disconnected"

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            if _metrics is not None:
                path = scope.get("path", "")
                _metrics.requests.inc(tags={"endpoint": path if path in _COUNTED_PATHS else "other", "status": status})


app.add_middleware(_CountRequests)


@dataclass(frozen=True)
class ServedModel:
    name: str
    spec: ModelSpec
    tokenizer: Any  # transformers fast tokenizer, or None (prompts must then be token ids)
    stop_token_ids: tuple[int, ...]  # end-of-turn ids besides the model's end of sequence


class PolicyUpdate(StrictBody):
    threshold: float | None = Field(None, gt=0, le=1)
    max_waiting: int | None = Field(None, ge=0)
    replicas: list[str] | None = None  # default: every replica


async def read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


class OpenAIIngress:
    async def __init__(self, config: ServeConfig, replica_handles: dict[str, Any]):
        global _metrics
        from dilaserve.serving.metrics import IngressMetrics

        _metrics = self.metrics = IngressMetrics()
        self.config = config
        self.load = LoadCounters()
        self.created = int(time.time())
        self.models = {m.name: await asyncio.to_thread(_load_served_model, m) for m in config.models}
        refs = [ReplicaRef(name, v.model, v.name, replica_handles[name]) for name, v in config.replica_names()]
        self.dispatcher = Dispatcher(refs, config.routing, config.admission, config.slo)
        await self._wait_for_replicas()

    async def _wait_for_replicas(self, timeout_s: float = REPLICA_START_TIMEOUT_S) -> None:
        """Ready only once every replica answers: the first requests would otherwise spend
        their deadline waiting for models to load, and be refused."""
        end = time.monotonic() + timeout_s
        while True:
            results = await self.dispatcher.broadcast("stats", timeout_s=30.0)
            waiting = sorted(name for name, r in results.items() if not isinstance(r, dict))
            if not waiting:
                return
            if time.monotonic() > end:
                logger.warning("serving without replicas %s, which did not start in %.0f s", waiting, timeout_s)
                return
            await asyncio.sleep(1.0)

    # -- OpenAI endpoints --------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.created, "owned_by": "dilaserve",
             "max_model_len": m.spec.max_positions} for m in self.models.values()
        ]}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, is_chat=True)

    async def _generate(self, request: Request, is_chat: bool) -> Response:
        arrival_s, arrival_unix_s = time.monotonic(), time.time()
        self._authorize(request)
        body = await read_body(request, self.config.http.max_body_bytes)
        req = parse_body(ChatCompletionRequest if is_chat else CompletionRequest, body)
        served = self.models.get(req.model)
        if served is None:
            raise ApiError(404, f"model {req.model!r} does not exist; available: {sorted(self.models)}",
                           param="model", code="model_not_found")
        prompt_ids = await asyncio.to_thread(_prompt_ids, served, req)
        limit = self.config.http.max_prompt_tokens
        if limit is not None and len(prompt_ids) > limit:
            raise invalid(f"the prompt has {len(prompt_ids)} tokens; this server accepts at most {limit}", "prompt")
        max_tokens = resolve_max_tokens(req.requested_max_tokens(), self.config.defaults.max_tokens,
                                        len(prompt_ids), served.spec.max_positions)
        params = to_sampling_params(req, model_defaults(self.config.defaults, served.spec), max_tokens=max_tokens,
                                    default_floor=self.config.slo.quality_floor, stop_token_ids=served.stop_token_ids)
        request_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.load.arrive()
        targets = slo_targets(req)

        async def redispatch(exclude: frozenset[str]) -> Dispatched:
            """The same request on another replica, once admitted (so best effort now)."""
            return await self.dispatcher.dispatch(
                request_id, served.name, prompt_ids, params, targets, is_best_effort=True,
                arrival_s=arrival_s, arrival_unix_s=arrival_unix_s, exclude=exclude, is_streamed=req.stream,
            )

        try:
            dispatched = await self.dispatcher.dispatch(
                request_id, served.name, prompt_ids, params, targets, is_best_effort=req.best_effort,
                arrival_s=arrival_s, arrival_unix_s=arrival_unix_s, is_streamed=req.stream,
            )
        except ApiError as exc:
            if exc.status == 429:
                self.load.refuse()
                self.metrics.admission.inc(tags={"model": served.name, "decision": "refused"})
            raise
        decision = "best_effort" if req.best_effort else "admitted"
        self.metrics.admission.inc(tags={"model": served.name, "decision": decision})
        ctx = ResponseContext(request_id, served.name, is_chat)
        if req.stream:
            return StreamingResponse(self._stream(ctx, dispatched, redispatch, arrival_s, req.include_usage_chunk),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._collect(ctx, dispatched, redispatch, arrival_s)

    def _progress(self, d: Dispatched, arrival_s: float) -> ResponseProgress:
        return ResponseProgress(arrival_s, d.replica, d.deadline, d.num_prompt_tokens, threshold=d.accepted.threshold)

    async def _failover(self, ctx: ResponseContext, d: Dispatched, exc: Exception, redispatch,
                        failed: set[str]) -> Dispatched:
        """After replica ``d.replica`` failed under a request: the request on another replica,
        or ApiError 503 when no attempt is left or no replica takes it."""
        logger.warning("replica %s failed under %s: %r", d.replica, ctx.request_id, exc)
        self.dispatcher.mark_failed(d.replica)
        failed.add(d.replica)
        if len(failed) >= MAX_ATTEMPTS:
            raise ApiError(503, f"generation failed on replicas {sorted(failed)}: {exc!r}", type="service_unavailable",
                           code="replica_failed", headers={"Retry-After": "1"})
        self.metrics.admission.inc(tags={"model": ctx.model, "decision": "retried"})
        try:
            return await redispatch(frozenset(failed))
        except ApiError as error:
            if error.status != 503:
                raise
            raise ApiError(503, f"replica {d.replica} failed under the request ({exc}) and no other replica "
                           f"could take it: {error.message}", type="service_unavailable", code="replica_failed",
                           headers={"Retry-After": "1"}) from None

    async def _collect(self, ctx: ResponseContext, d: Dispatched, redispatch, arrival_s: float) -> Response:
        failed: set[str] = set()
        while True:
            progress = self._progress(d, arrival_s)
            try:
                async for chunk in d:
                    progress.observe(chunk)
                    if chunk.finished:
                        break
            except Exception as exc:  # the replica died under the request: try another one
                self._settle(ctx, d, progress)
                d = await self._failover(ctx, d, exc, redispatch, failed)
                continue
            except BaseException:
                self._settle(ctx, d, progress)
                raise
            self._settle(ctx, d, progress)
            break
        last = progress.last
        if last is None or last.error is not None:
            raise ApiError(500, f"generation failed on replica {d.replica}: "
                           f"{last.error if last else 'the stream ended early'}", type="server_error")
        return JSONResponse(ctx.full(progress.text, last.finish_reason, progress.usage(), progress.summary()))

    async def _stream(self, ctx: ResponseContext, d: Dispatched, redispatch, arrival_s: float,
                      include_usage: bool) -> AsyncIterator[bytes]:
        failed: set[str] = set()
        progress = self._progress(d, arrival_s)
        try:
            if ctx.is_chat:
                yield sse(ctx.chunk("", is_first=True))
            while True:
                try:
                    async for chunk in d:
                        progress.observe(chunk)
                        if chunk.error is not None:
                            yield sse(ApiError(chunk.error_status or 500, chunk.error, type="server_error").body())
                            break
                        if chunk.text or chunk.token_ids or chunk.finished:
                            # Every chunk's token_ids are its own; the last adds the response summary.
                            extra = {**(progress.summary() if chunk.finished else {}), "token_ids": chunk.token_ids}
                            yield sse(ctx.chunk(chunk.text, chunk.finish_reason, extra=extra))
                        if chunk.finished:
                            break
                except Exception as exc:
                    if progress.token_ids or progress.text:  # the client has part of the text: say so
                        self._settle(ctx, d, progress)
                        self.dispatcher.mark_failed(d.replica)
                        logger.warning("replica %s failed mid-stream under %s: %r", d.replica, ctx.request_id, exc)
                        yield sse(ApiError(503, f"replica {d.replica} failed after {len(progress.token_ids)} tokens "
                                           f"of this stream were sent ({exc!r}); the response is incomplete: "
                                           "send the request again", type="service_unavailable",
                                           code="replica_failed").body())
                        yield SSE_DONE
                        return
                    self._settle(ctx, d, progress)
                    try:
                        d = await self._failover(ctx, d, exc, redispatch, failed)
                    except ApiError as error:
                        yield sse(error.body())
                        yield SSE_DONE
                        return
                    progress = self._progress(d, arrival_s)
                    continue
                break
            if not progress.is_finished:
                yield sse(ApiError(500, f"the stream from replica {d.replica} ended early", type="server_error").body())
            elif include_usage:
                yield sse(ctx.usage_chunk(progress.usage()))
            yield SSE_DONE
        finally:
            if not progress.is_settled:
                self._settle(ctx, d, progress)

    def _settle(self, ctx: ResponseContext, d: Dispatched, progress: ResponseProgress) -> None:
        """End of a response (or of one attempt), however it ended: free the replica slot, abort
        what is still running there (the client left), record metrics of what finished."""
        progress.is_settled = True
        self.dispatcher.release(d.replica)
        if not progress.is_finished:
            d.stream.cancel()
            self.dispatcher.abort_soon(d.replica, ctx.request_id)
            return
        self.load.finish(progress.num_prompt_tokens, progress.num_completion_tokens, bool(progress.is_slo_met))
        m, tags = self.metrics, {"model": ctx.model}
        m.e2e.observe(progress.e2e_s, tags)
        if progress.ttft_s is not None:
            m.ttft.observe(progress.ttft_s, tags)
        if progress.tpot_s is not None:
            m.tpot.observe(progress.tpot_s, tags)
        m.slo.inc(tags={**tags, "outcome": "met" if progress.is_slo_met else "missed"})
        last = progress.last
        if last.threshold is not None:
            m.threshold.observe(last.threshold, tags)
        if last.num_steps:
            m.tokens_per_step.observe(last.num_tokens_decided / last.num_steps, tags)
        # Ray's counters refuse inc(0), and a completion may end at once (end of text first).
        if progress.num_completion_tokens:
            m.generated_tokens.inc(progress.num_completion_tokens, tags)
        if progress.num_prompt_tokens:
            m.prompt_tokens.inc(progress.num_prompt_tokens, tags)

    # -- operations -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        results = await self.dispatcher.broadcast("stats", timeout_s=5.0)
        healthy = {name: isinstance(r, dict) for name, r in results.items()}
        models_up = {m: any(healthy[r.name] for r in self.dispatcher.replicas_of(m)) for m in self.models}
        ok = all(models_up.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "replicas": healthy}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_page(self) -> Response:
        from dilaserve.serving.metrics_export import gather_cluster_metrics

        return Response(await gather_cluster_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/dilaserve/replicas")
    async def replicas(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"replicas": await self.dispatcher.broadcast("stats")}

    @app.post("/v1/dilaserve/policy")
    async def set_policy(self, request: Request) -> dict[str, Any]:
        """Pushes a default threshold and / or waiting limit to live replicas (no restart)."""
        self._authorize(request)
        update = parse_body(PolicyUpdate, await read_body(request, self.config.http.max_body_bytes))
        known = {r.name for r in self.dispatcher.replicas}
        unknown = sorted(set(update.replicas or ()) - known)
        if unknown:
            raise invalid(f"unknown replica(s) {unknown}; known: {sorted(known)}", "replicas")
        results = await self.dispatcher.broadcast("set_policy", update.replicas, threshold=update.threshold,
                                                  max_waiting=update.max_waiting)
        return {"replicas": results}

    # -- the controller's interface (Serve handle calls) ----------------------------------------
    async def load_report(self) -> dict[str, Any]:
        """Counters of the offered load since this ingress started, recent lengths, and every
        routed replica with its in-flight count and its own stats (or the error it gave)."""
        stats = await self.dispatcher.broadcast("stats", timeout_s=5.0)
        replicas = [{**row, "stats": stats.get(row["name"])} for row in self.dispatcher.replica_table()]
        return {**self.load.report(), "replicas": replicas}

    async def add_replica(self, name: str, model: str, variant: str, deployment_name: str, app_name: str) -> None:
        """Starts routing to a replica that is already running in its own Serve application."""
        handle = serve.get_deployment_handle(deployment_name, app_name=app_name)
        self.dispatcher.add_replica(ReplicaRef(name, model, variant, handle))
        logger.info("routing to replica %s (%s/%s)", name, app_name, deployment_name)

    async def drain_replica(self, name: str) -> None:
        self.dispatcher.drain(name)
        logger.info("draining replica %s", name)

    async def remove_replica(self, name: str) -> None:
        self.dispatcher.remove(name)
        logger.info("no longer routing to replica %s", name)

    def _authorize(self, request: Request) -> None:
        key = self.config.http.api_key
        if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")


def _load_served_model(model) -> ServedModel:
    from dilaserve.models.registry import read_spec
    from dilaserve.models.tokenizer import EOT_TOKEN, load_tokenizer
    from dilaserve.serving.model_store import resolve_model_dir

    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    stop_ids: tuple[int, ...] = ()
    if tokenizer is not None:
        eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            stop_ids = (eot,)
    return ServedModel(model.name, read_spec(model_dir), tokenizer, stop_ids)


def _prompt_ids(served: ServedModel, req: CompletionRequest | ChatCompletionRequest) -> list[int]:
    tok = served.tokenizer
    if isinstance(req, ChatCompletionRequest):
        if tok is None:
            raise invalid(f"model {served.name!r} has no tokenizer: use /v1/completions with token ids", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if tok.chat_template:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        ids = tok.encode(text, add_special_tokens=False)
    elif isinstance(req.prompt, str):
        if tok is None:
            raise invalid(f"model {served.name!r} has no tokenizer: send the prompt as token ids", "prompt")
        ids = tok.encode(req.prompt, add_special_tokens=False)
    else:
        ids = list(req.prompt)
        bad = next((t for t in ids if not 0 <= t < served.spec.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {served.spec.vocab_size})", "prompt")
    if not ids:
        raise invalid("the prompt is empty", "prompt")
    return ids


_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
           "/v1/dilaserve/policy": PolicyUpdate}
_ERRORS = {"400": "invalid request (the message names the field)", "401": "missing or wrong API key",
           "404": "unknown model", "413": "request body too large",
           "429": "refused: the deadline cannot be met now (see Retry-After)", "503": "no replica available"}


def _openapi() -> dict[str, Any]:
    """FastAPI's description of the routes, plus the request bodies (the endpoints read and
    validate their bodies themselves, so FastAPI cannot see them) and the error answers."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version="1", routes=app.routes,
                             description="OpenAI-compatible API of DiLaServe; errors are OpenAI-style bodies.")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        error = {"description": "", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        components["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
        for path, model in _BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            operation = schema["paths"][path]["post"]
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            operation.pop("parameters", None)
            operation["responses"] = {"200": {"description": "the answer (a JSON body, or server-sent events "
                                                             "when stream is true)"},
                                      **{code: {**error, "description": why} for code, why in _ERRORS.items()}}
        for item in schema["paths"].values():
            for operation in item.values():  # the handlers' ``request`` argument is no query parameter
                operation["parameters"] = [p for p in operation.get("parameters", []) if p.get("name") not in ("request", "self")]
                if not operation["parameters"]:
                    operation.pop("parameters")
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi

# The deployment wraps the class rather than decorating it, so that the class stays importable
# by name and Ray pickles it by reference (a decorated class is pickled by value, without the
# module's helpers).
Ingress = serve.deployment(max_ongoing_requests=4096)(serve.ingress(app)(OpenAIIngress))
