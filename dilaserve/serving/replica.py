"""The replica deployment: one model instance, its ``AsyncEngine``, behind Ray Serve.

The engine knows only token ids; the replica adds what sits between it and the ingress:
the current default threshold and sparse-KV retention (changed live by ``set_policy``),
incremental detokenization and stop strings (a match aborts the engine request and ends the
stream with "stop"), and
the predictions the ingress uses for admission and routing. A stream that ends early for any
other reason (client gone, ingress cancelled) aborts the engine request, freeing its pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator

from ray import serve

from dilaserve.engine.sampling_params import RequestOutput, SamplingParams
from dilaserve.errors import InvalidRequestError, QueueFullError
from dilaserve.serving.admission import SQUEEZE_REASON, Prediction, decide, refusal_message
from dilaserve.serving.config import ModelConfig, VariantConfig
from dilaserve.serving.detokenizer import IncrementalDetokenizer
from dilaserve.serving.messages import AdmissionCheck, Chunk, Estimate, GenerateRequest
from dilaserve.serving.openai_protocol import with_replica_defaults

logger = logging.getLogger(__name__)

METRICS_PERIOD_S = 1.0
# Engine finish reasons as OpenAI names them; "eos" and stop token ids both mean "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort", "error": "error"}
KEEP = "keep"  # set_policy's kv_retention when it is not to change (None means dense)


class ReplicaServer:
    async def __init__(self, name: str, model: ModelConfig, variant: VariantConfig, max_waiting: int | None = None):
        from dilaserve.engine.async_engine import AsyncEngine
        from dilaserve.engine.config import EngineConfig
        from dilaserve.models.tokenizer import load_tokenizer
        from dilaserve.serving.metrics import ReplicaMetrics
        from dilaserve.serving.model_store import resolve_model_dir

        if model.device == "cpu":
            import torch

            torch.set_num_threads(max(1, int(variant.num_cpus_per_replica)))
        self.name, self.model_name, self.variant = name, model.name, variant.name
        model_dir = await asyncio.to_thread(resolve_model_dir, model)
        engine_config = EngineConfig(**{**dict(variant.engine), "tensor_parallel": variant.tensor_parallel})
        self.engine = AsyncEngine(str(model_dir), engine_config, device=model.device, dtype=model.dtype)
        await self.engine.start()
        self.tokenizer = getattr(self.engine, "tokenizer", None)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(model_dir)
        self.default_threshold: float = variant.threshold or engine_config.default_threshold
        self.default_kv_retention: float | None = variant.kv_retention  # None: dense
        self.is_block_causal = bool(getattr(getattr(self.engine, "spec", None), "causal_block_size", 0))
        self.max_waiting = max_waiting  # waiting requests before this replica answers 429
        self.engine.set_policy(default_threshold=self.default_threshold, max_waiting=max_waiting)
        self._metrics = ReplicaMetrics(model.name, variant.name)
        self._metrics_task = asyncio.get_running_loop().create_task(self._report_metrics())
        logger.info("replica %s serving %s from %s", name, model.name, model_dir)

    # -- requests ----------------------------------------------------------------------------
    def resolve(self, params: SamplingParams) -> SamplingParams:
        """The params as this replica runs them: its default threshold where none was asked,
        never below the request's quality floor; its sparse-KV retention where none was asked
        and sparse KV is valid (see ``with_replica_defaults``)."""
        return with_replica_defaults(params, self.default_threshold, self.default_kv_retention, self.is_block_causal)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        params = self.resolve(request.params)
        rid = request.request_id
        if self.max_waiting is not None and self.engine.stats().num_waiting >= self.max_waiting:
            yield Chunk(error=f"replica {self.name} has {self.max_waiting} requests waiting", error_status=429)
            return
        deadline = None
        if request.deadline_unix_s is not None:
            deadline = time.monotonic() + (request.deadline_unix_s - time.time())
        if request.admission is not None and deadline is not None:
            # From this check to add_request nothing awaits: no other admission slips between.
            refusal = self._confirm(len(request.prompt_ids), params, request.admission)
            if refusal is not None:
                yield refusal
                return
        try:
            stream = self.engine.add_request(rid, list(request.prompt_ids), params, deadline)
        except QueueFullError as exc:
            yield Chunk(error=str(exc), error_status=429)
            return
        except InvalidRequestError as exc:
            yield Chunk(error=str(exc), error_status=400)
            return
        except RuntimeError as exc:  # the engine loop has failed; Serve's health check replaces us
            yield Chunk(error=f"replica {self.name} cannot decode: {exc}", error_status=503)
            return
        yield Chunk(is_accepted=True, threshold=params.threshold, kv_retention=params.kv_retention,
                    num_prompt_tokens=len(request.prompt_ids))
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        is_done = False
        # A request that is not streamed to its client gets its text in the last chunk only:
        # one message instead of one per step (under load those messages cost more CPU than
        # a small model's steps).
        held_text, held_ids = "", []
        try:
            async for out in stream:
                update = detok.push(out.new_token_ids)
                if update.is_stopped:
                    is_done = True
                    await self.engine.abort(rid)
                    yield self._last_chunk(out, held_text + update.text, "stop", params, held_ids)
                    return
                if out.finished:
                    is_done = True
                    tail = detok.finish()
                    reason = "stop" if tail.is_stopped else FINISH_REASONS.get(out.finish_reason, out.finish_reason)
                    yield self._last_chunk(out, held_text + update.text + tail.text, reason, params, held_ids)
                    return
                if not request.is_streamed:
                    held_text += update.text
                    held_ids += out.new_token_ids
                elif update.text or out.new_token_ids:
                    yield Chunk(text=update.text, token_ids=list(out.new_token_ids),
                                num_completion_tokens=len(out.token_ids))
        except RuntimeError as exc:  # the engine failed mid-request: this replica cannot go on
            is_done = True
            yield Chunk(finished=True, finish_reason="error", error=f"replica {self.name} failed: {exc}",
                        error_status=503)
        finally:
            if not is_done:  # the consumer went away: free the engine's pages now
                await self.engine.abort(rid)
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def _last_chunk(self, out: RequestOutput, text: str, reason: str | None, params: SamplingParams,
                    held_ids: list[int] = ()) -> Chunk:
        return Chunk(
            text=text, token_ids=[*held_ids, *out.new_token_ids], finished=True, finish_reason=reason,
            num_prompt_tokens=out.num_prompt_tokens, num_completion_tokens=len(out.token_ids),
            threshold=out.threshold if out.threshold is not None else params.threshold,
            kv_retention=params.kv_retention,
            num_steps=out.counters.num_steps,
            num_tokens_decided=out.counters.num_tokens_decided,
            chunk_size=out.counters.mean_chunk_size,
            error=out.error, error_status=500 if reason == "error" else None,
        )

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def _confirm(self, prompt_len: int, params: SamplingParams, check: AdmissionCheck) -> Chunk | None:
        """The ingress's admission check again (``decide`` and the least slack), against
        everything this engine holds now, requests other ingress calls admitted after this
        one's estimate included; a 429 chunk when it no longer passes."""
        at = self._floor_threshold(params)
        finish = self.engine.predict_finish_s(prompt_len, params, at, check.reserve)
        usable = check.finish_by_unix_s - time.time()
        if finish > usable:
            decision = decide(usable, [Prediction(finish, self.engine.predict_latency_s(prompt_len, params, at))])
            return self._refusal(refusal_message(f"{decision.reason} (replica {self.name}, checked again on arrival)"), decision.retry_after_s)
        predict_slack = getattr(self.engine, "predict_min_slack_s", None)
        if predict_slack is not None and predict_slack(prompt_len, params, at, check.reserve) < 0:
            return self._refusal(refusal_message(f"{SQUEEZE_REASON} on replica {self.name}"), 1)
        return None

    @staticmethod
    def _refusal(message: str, retry_after_s: int) -> Chunk:
        return Chunk(error=message, error_status=429, error_code="deadline_unattainable", retry_after_s=retry_after_s)

    @staticmethod
    def _floor_threshold(params: SamplingParams) -> float | None:
        """The threshold admission prices a request at: its quality floor when that is lower."""
        threshold, floor = params.threshold, params.threshold_floor
        return floor if floor is not None and threshold is not None and floor < threshold else threshold

    # -- predictions, load and policy ----------------------------------------------------------
    async def estimate(self, prompt_len: int, params: SamplingParams, reserve: float = 0.0) -> Estimate:
        """Predictions for a prospective request; ``reserve``: the share of every admitted
        request's remaining time kept for prediction error (see ``min_slack_s``)."""
        params = self.resolve(params)
        threshold = params.threshold
        solo = self.engine.predict_latency_s(prompt_len, params, threshold)
        # With a reserve, finish predictions are priced for the dispatcher's check against
        # (1 - reserve) x the time left (EngineCore.prediction_factor).
        finish = self.engine.predict_finish_s(prompt_len, params, threshold, reserve)
        finish_floor, solo_floor = finish, solo
        at = self._floor_threshold(params)
        if at != threshold:
            finish_floor = self.engine.predict_finish_s(prompt_len, params, at, reserve)
            solo_floor = self.engine.predict_latency_s(prompt_len, params, at)
        predict_slack = getattr(self.engine, "predict_min_slack_s", None)
        min_slack = predict_slack(prompt_len, params, at, reserve) if predict_slack else float("inf")
        stats = self.engine.stats()
        return Estimate(
            replica=self.name, solo_s=solo, finish_s=finish, finish_at_floor_s=finish_floor,
            solo_at_floor_s=solo_floor, threshold=threshold, num_waiting=stats.num_waiting,
            num_running=stats.num_running, min_slack_s=min_slack,
            is_calibrated=bool(getattr(self.engine, "is_calibrated", True)),
        )

    async def stats(self) -> dict[str, Any]:
        tp = getattr(getattr(self.engine, "engine", None), "tp", None)
        return {
            "name": self.name, "model": self.model_name, "variant": self.variant,
            "default_threshold": self.default_threshold, "default_kv_retention": self.default_kv_retention,
            "max_waiting": self.max_waiting,
            "tensor_parallel": tp.degree if tp is not None else 1,
            "worker_pids": tp.worker_pids() if tp is not None else [],
            "engine": dataclasses.asdict(self.engine.stats()),
        }

    async def set_policy(self, threshold: float | None = None, max_waiting: int | None = None,
                         kv_retention: float | None | str = KEEP) -> dict[str, Any]:
        """Changes the default threshold, the waiting-queue limit and / or the sparse-KV retention
        (None: dense; ``KEEP``, the default: unchanged) live. Requests in flight keep running;
        new ones use the new values."""
        if threshold is not None:
            if not 0.0 < threshold <= 1.0:
                raise InvalidRequestError(f"threshold must be in (0, 1], got {threshold}")
            self.default_threshold = threshold
        if kv_retention != KEEP:
            if kv_retention is not None and (isinstance(kv_retention, (bool, str)) or not 0.0 < kv_retention <= 1.0):
                raise InvalidRequestError(f"kv_retention must be in (0, 1] or None (dense), got {kv_retention!r}")
            self.default_kv_retention = kv_retention
        if max_waiting is not None:
            if max_waiting < 0:
                raise InvalidRequestError(f"max_waiting must be >= 0, got {max_waiting}")
            self.max_waiting = max_waiting
        self.engine.set_policy(default_threshold=threshold, max_waiting=max_waiting)
        logger.info("replica %s policy: threshold %s, kv_retention %s, max_waiting %s",
                    self.name, self.default_threshold, self.default_kv_retention, self.max_waiting)
        return await self.stats()

    async def check_health(self) -> None:
        """Called by Serve; raising marks the replica unhealthy and Serve replaces it."""
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            result = check()
            if asyncio.iscoroutine(result):
                await result
        self.engine.stats()

    async def _report_metrics(self) -> None:
        while True:
            try:
                self._metrics.report(self.engine.stats(), self.default_threshold)
            except Exception:  # metrics must never take the replica down
                logger.exception("replica %s: reporting metrics failed", self.name)
            await asyncio.sleep(METRICS_PERIOD_S)

    async def __del__(self) -> None:
        # Also called when __init__ failed part-way (Serve then retries the replica): stop what
        # was started, and only that.
        task = getattr(self, "_metrics_task", None)
        if task is not None:
            task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.stop()


# Wrapping (not decorating) keeps ReplicaServer importable by name, so Ray pickles it by reference.
Replica = serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=20)(
    ReplicaServer
)
