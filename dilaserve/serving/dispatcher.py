"""From a validated request to a stream from one replica: deadline, admission, routing.

Routing happens here, in the ingress, over one Serve deployment per replica, rather than in
a Ray Serve ``RequestRouter`` (which Ray 2.60 offers, as an alpha API). Reasons:
(1) admission must see every replica's predicted finish time for *this* request before any
replica is chosen, and refuse with 429 when none fits; a ``RequestRouter`` can only pick among
replicas, not refuse; (2) a ``RequestRouter`` sees replica state as periodically polled
routing stats, while slack needs a fresh, per-request prediction (it depends on the prompt
length, max_tokens and threshold); (3) abort, live threshold changes and per-replica stats
must reach one particular replica, or every replica, which a handle to a multi-replica
deployment cannot address. The replica set can change live (``add_replica``, ``drain``,
``remove``): the controller (``dilaserve/controller``) scales that way, because redeploying
the application restarts every deployment in it.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.serving.admission import (
    SQUEEZE_REASON, Deadline, Prediction, SLODefaults, SLOTargets, assign_deadline, decide, refusal_message,
)
from dilaserve.serving.config import AdmissionConfig, RoutingConfig, SLOConfig
from dilaserve.serving.messages import AdmissionCheck, Chunk, Estimate, GenerateRequest
from dilaserve.serving.openai_protocol import ApiError
from dilaserve.serving.router import ReplicaLoad, make_router

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaRef:
    name: str
    model: str
    variant: str
    handle: Any  # a Serve DeploymentHandle to the replica's deployment


@dataclass
class Dispatched:
    """An admitted request, on its way back from one replica."""

    replica: str
    deadline: Deadline
    accepted: Chunk
    stream: Any  # DeploymentResponseGenerator of Chunk
    estimate: Estimate
    num_prompt_tokens: int = 0

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        async for chunk in self.stream:
            if chunk.error is not None and chunk.error_status == 503:
                # The replica's engine failed (say a tensor-parallel worker died): for the
                # ingress this is the replica failing under the request, which it fails over.
                raise ReplicaFailedError(chunk.error)
            yield chunk


class ReplicaFailedError(RuntimeError):
    """A replica reported (a 503 chunk) that its engine cannot decode."""


@dataclass
class Dispatcher:
    replicas: list[ReplicaRef]
    routing: RoutingConfig
    admission: AdmissionConfig
    slo: SLOConfig
    in_flight: dict[str, int] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)  # replicas that get no new requests

    def __post_init__(self) -> None:
        self.router = make_router(self.routing.policy, self.routing.seed)
        # Replicas that failed a call (died, or gave no estimate in time): skipped until a
        # background probe gets an answer from them again (Serve restarts a dead replica
        # behind the same handle), so requests do not each wait for the estimate timeout.
        self.failed: set[str] = set()
        self._probes: dict[str, asyncio.Task] = {}
        self.slo_defaults = SLODefaults(
            self.slo.slo_scale,
            None if self.slo.ttft_ms is None else self.slo.ttft_ms / 1e3,
            None if self.slo.tpot_ms is None else self.slo.tpot_ms / 1e3,
        )
        self._background: set[asyncio.Task] = set()

    def replicas_of(self, model: str) -> list[ReplicaRef]:
        return [r for r in self.replicas if r.model == model]

    def routable(self, model: str, exclude: frozenset[str] = frozenset()) -> list[ReplicaRef]:
        """Replicas that may get new requests: not draining, not excluded, and not failed
        (unless every one has failed: then they are tried, and time out, again)."""
        live = [r for r in self.replicas_of(model) if r.name not in self.draining and r.name not in exclude]
        healthy = [r for r in live if r.name not in self.failed]
        return healthy or live

    async def estimates(self, model: str, prompt_len: int, params: SamplingParams,
                        exclude: frozenset[str] = frozenset()) -> list[Estimate]:
        refs = self.routable(model, exclude)
        timeout = self.routing.estimate_timeout_ms / 1e3
        reserve = (self.admission.headroom,) if self.admission.headroom > 0 else ()
        results = await asyncio.gather(
            *(asyncio.wait_for(r.handle.estimate.remote(prompt_len, params, *reserve), timeout) for r in refs),
            return_exceptions=True,
        )
        ok = []
        for ref, result in zip(refs, results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                logger.warning("replica %s gave no estimate: %r", ref.name, result)
                self.mark_failed(ref.name)
            else:
                ok.append(result)
        return ok

    def mark_failed(self, name: str) -> None:
        """Stops routing to ``name`` until it answers a probe again."""
        self.failed.add(name)
        if name in self._probes:
            return
        ref = next((r for r in self.replicas if r.name == name), None)
        if ref is None:
            return
        task = asyncio.get_running_loop().create_task(self._probe(ref))
        self._probes[name] = task
        task.add_done_callback(lambda _: self._probes.pop(name, None))

    async def _probe(self, ref: ReplicaRef, interval_s: float = 0.5, timeout_s: float = 10.0) -> None:
        while ref.name in self.failed and any(r.name == ref.name for r in self.replicas):
            try:
                await asyncio.wait_for(ref.handle.stats.remote(), timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("replica %s is still failing: %r", ref.name, exc)
                await asyncio.sleep(interval_s)
            else:
                self.failed.discard(ref.name)
                logger.warning("replica %s answers again; routing to it", ref.name)

    async def dispatch(
        self, request_id: str, model: str, prompt_ids: list[int], params: SamplingParams, targets: SLOTargets,
        *, is_best_effort: bool, arrival_s: float, arrival_unix_s: float, exclude: frozenset[str] = frozenset(),
        is_streamed: bool = True,
    ) -> Dispatched:
        """Admits (or refuses with ApiError 429) and routes one request; returns its stream
        once the replica has accepted it. A replica that fails to accept it is marked failed
        and the next candidate is tried; ``exclude`` names replicas not to use (a retry's)."""
        estimates = await self.estimates(model, len(prompt_ids), params, exclude)
        # A replica may have started draining while the estimates were on their way; from here
        # to counting the request in flight nothing awaits, so a drained replica stays drained.
        estimates = [e for e in estimates if e.replica not in self.draining]
        if not estimates:
            raise ApiError(503, f"no replica of model {model!r} is available", type="service_unavailable",
                           code="no_replica", headers={"Retry-After": "1"})
        overhead_s = self.slo.overhead_ms / 1e3
        # The typical replica's solo latency: a median is robust to one replica whose online
        # cost model is off (they are fitted separately, and on a busy CPU they disagree).
        solo_s = statistics.median(e.solo_s for e in estimates) + overhead_s
        deadline = assign_deadline(targets, self.slo_defaults, solo_s, params.max_tokens)
        remaining_s = deadline.budget_s - (time.monotonic() - arrival_s)
        if self.admission.max_waiting is not None and self.admission.enabled and not is_best_effort:
            estimates = [e for e in estimates if e.num_waiting < self.admission.max_waiting]
            if not estimates:
                raise ApiError(429, "every replica's waiting queue is full; retry later or set best_effort",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        if self.admission.enabled and not is_best_effort:
            # Admitted requests that are on time must stay on time: a newcomer that would make
            # one of them late is refused even when it would itself finish in time.
            unsqueezed = [e for e in estimates if e.min_slack_s >= 0]
            if not unsqueezed:
                raise ApiError(429, refusal_message(f"every replica is full ({SQUEEZE_REASON})"),
                               type="rate_limit_error", code="deadline_unattainable", headers={"Retry-After": "1"})
            estimates = unsqueezed
        at_floor = [Prediction(e.finish_at_floor_s + overhead_s, e.solo_at_floor_s + overhead_s) for e in estimates]
        usable_s = remaining_s * (1.0 - self.admission.headroom)
        decision = decide(usable_s, at_floor, is_enabled=self.admission.enabled, is_best_effort=is_best_effort)
        if not decision.is_admitted:
            raise ApiError(429, refusal_message(decision.reason), type="rate_limit_error",
                           code="deadline_unattainable", headers={"Retry-After": str(decision.retry_after_s)})
        by_name = {e.replica: e for e in estimates}
        candidates = list(estimates)
        # The replica confirms the admission when it accepts: estimates of concurrent requests
        # are taken before any of them lands, and would otherwise all see the same free room.
        check = (AdmissionCheck(self.admission.headroom, time.time() + usable_s - overhead_s)
                 if self.admission.enabled and not is_best_effort else None)
        while True:
            loads = [ReplicaLoad(e.replica, e.finish_s, self.in_flight.get(e.replica, 0), e.is_calibrated)
                     for e in candidates]
            choice = self.router.choose(loads, remaining_s)
            ref = next(r for r in self.replicas if r.name == choice.name)
            stream = ref.handle.options(stream=True).generate.remote(GenerateRequest(
                request_id, prompt_ids, params, arrival_unix_s + deadline.budget_s, is_streamed, check))
            self.in_flight[ref.name] = self.in_flight.get(ref.name, 0) + 1
            try:
                accepted: Chunk = await stream.__anext__()
                if accepted.error is not None and accepted.error_status == 503:
                    raise ReplicaFailedError(accepted.error)  # its engine failed: as if it had died
            except Exception as exc:  # the replica died, is unreachable or cannot decode: try the next one
                self.release(ref.name)
                stream.cancel()
                logger.warning("replica %s failed to accept %s: %r", ref.name, request_id, exc)
                self.mark_failed(ref.name)
                candidates = [e for e in candidates if e.replica != ref.name]
                if not candidates:
                    raise ApiError(503, f"the replicas of model {model!r} failed to accept the request: {exc!r}",
                                   type="service_unavailable", code="replica_failed",
                                   headers={"Retry-After": "1"}) from None
                continue
            except BaseException:
                self.release(ref.name)
                stream.cancel()
                raise
            if accepted.error_status == 429 and len(candidates) > 1:  # full by now: another may have room
                self.release(ref.name)
                candidates = [e for e in candidates if e.replica != ref.name]
                continue
            break
        if accepted.error is not None:
            self.release(ref.name)
            status = accepted.error_status or 500
            kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
            code = accepted.error_code or ("queue_full" if status == 429 else None)
            retry = {"Retry-After": str(accepted.retry_after_s if status == 429 else 1)}
            raise ApiError(status, accepted.error, type=kind, code=code,
                           headers=retry if status in (429, 503) else None)
        return Dispatched(ref.name, deadline, accepted, stream, by_name[ref.name], len(prompt_ids))

    def release(self, replica: str) -> None:
        self.in_flight[replica] = max(0, self.in_flight.get(replica, 0) - 1)

    def abort_soon(self, replica: str, request_id: str) -> None:
        """Aborts in the background: callers are often being cancelled themselves."""
        ref = next(r for r in self.replicas if r.name == replica)
        task = asyncio.get_running_loop().create_task(self._abort(ref, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, ref: ReplicaRef, request_id: str) -> None:
        try:
            await ref.handle.abort.remote(request_id)
        except Exception:
            logger.exception("aborting %s on %s failed", request_id, ref.name)

    async def broadcast(self, method: str, names: list[str] | None = None, timeout_s: float = 10.0,
                        **kwargs: Any) -> dict[str, Any]:
        """Calls ``method`` on every replica (or those named); returns results or errors by name."""
        refs = [r for r in self.replicas if names is None or r.name in names]
        results = await asyncio.gather(
            *(asyncio.wait_for(getattr(r.handle, method).remote(**kwargs), timeout_s) for r in refs),
            return_exceptions=True,
        )
        return {r.name: (repr(x) if isinstance(x, BaseException) else x) for r, x in zip(refs, results)}

    # -- a live replica set (the controller's scaling) -----------------------------------------
    def add_replica(self, ref: ReplicaRef) -> None:
        if any(r.name == ref.name for r in self.replicas):
            raise ValueError(f"replica {ref.name!r} is already routed")
        self.replicas.append(ref)

    def drain(self, name: str) -> None:
        """No new requests go to ``name``; those in flight finish."""
        if not any(r.name == name for r in self.replicas):
            raise ValueError(f"no replica {name!r}")
        self.draining.add(name)

    def remove(self, name: str) -> None:
        """Forgets a drained replica (refuses while requests are in flight there)."""
        if self.in_flight.get(name, 0):
            raise ValueError(f"replica {name!r} still has {self.in_flight[name]} requests in flight")
        self.replicas = [r for r in self.replicas if r.name != name]
        self.draining.discard(name)
        self.failed.discard(name)
        self.in_flight.pop(name, None)

    def replica_table(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "model": r.model, "variant": r.variant, "is_draining": r.name in self.draining,
                 "num_in_flight": self.in_flight.get(r.name, 0), "app_name": getattr(r.handle, "app_name", None),
                 "deployment_name": getattr(r.handle, "deployment_name", None)} for r in self.replicas]
