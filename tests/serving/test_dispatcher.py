"""Admission and routing glue over plain fake replica handles (no Ray): which replica gets a
request, when it is refused, and what happens when replicas fail."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.serving.admission import SLOTargets
from dilaserve.serving.config import AdmissionConfig, RoutingConfig, SLOConfig
from dilaserve.serving.dispatcher import Dispatcher, ReplicaRef
from dilaserve.serving.messages import Chunk, Estimate
from dilaserve.serving.openai_protocol import ApiError


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _Stream:
    def __init__(self, chunks):
        self.chunks, self.is_cancelled = list(chunks), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self):
        self.is_cancelled = True


@dataclass
class FakeReplica:
    """Stands in for a Serve handle to one replica; predictions are set by the test."""

    name: str
    solo_s: float = 0.1
    backlog_s: float = 0.0
    num_waiting: int = 0
    first_chunk: Chunk = field(default_factory=lambda: Chunk(is_accepted=True, threshold=0.9))
    is_down: bool = False
    sent: list = field(default_factory=list)
    aborted: list = field(default_factory=list)

    def __post_init__(self):
        self.estimate = _Call(self._estimate)
        self.generate = _Call(self._generate)
        self.abort = _Call(self._abort)

    def options(self, **_):
        return self

    async def _estimate(self, prompt_len, params):
        if self.is_down:
            raise ConnectionError("replica down")
        finish = self.backlog_s + self.solo_s
        return Estimate(self.name, self.solo_s, finish, finish, self.solo_s, 0.9, self.num_waiting, 0)

    def _generate(self, request):
        self.sent.append(request)
        return _Stream([self.first_chunk, Chunk(text="ok", token_ids=[1], finished=True, finish_reason="stop")])

    async def _abort(self, request_id):
        self.aborted.append(request_id)


def make_dispatcher(*replicas, policy="slack", admission=AdmissionConfig(), slo=SLOConfig(slo_scale=5.0,
                    overhead_ms=0.0)) -> Dispatcher:
    refs = [ReplicaRef(r.name, "m", "v", r) for r in replicas]
    return Dispatcher(refs, RoutingConfig(policy=policy, estimate_timeout_ms=500), admission, slo)


def dispatch(d: Dispatcher, targets=SLOTargets(), is_best_effort=False, request_id="r1"):
    params = SamplingParams(max_tokens=16, threshold=None)
    return asyncio.run(d.dispatch(request_id, "m", [1, 2, 3], params, targets, is_best_effort=is_best_effort,
                                  arrival_s=time.monotonic(), arrival_unix_s=time.time()))


def test_routes_to_the_replica_with_most_slack_and_counts_it_in_flight():
    busy, idle = FakeReplica("busy", backlog_s=0.3), FakeReplica("idle")
    d = make_dispatcher(busy, idle)
    dispatched = dispatch(d)
    assert dispatched.replica == "idle" and idle.sent and not busy.sent
    assert d.in_flight == {"idle": 1}
    d.release("idle")
    assert d.in_flight == {"idle": 0}


def test_deadline_is_slo_scale_times_the_median_solo_latency():
    d = make_dispatcher(FakeReplica("a", solo_s=0.1), FakeReplica("b", solo_s=0.3), FakeReplica("c", solo_s=0.2))
    assert dispatch(d).deadline.budget_s == pytest.approx(1.0)


def test_refuses_with_429_when_no_replica_can_make_the_deadline():
    a, b = FakeReplica("a", backlog_s=2.0), FakeReplica("b", backlog_s=3.0)
    with pytest.raises(ApiError) as info:
        dispatch(make_dispatcher(a, b))
    assert info.value.status == 429 and info.value.code == "deadline_unattainable"
    assert int(info.value.headers["Retry-After"]) >= 1
    assert not a.sent and not b.sent


def test_best_effort_and_disabled_admission_are_served_anyway():
    assert dispatch(make_dispatcher(FakeReplica("a", backlog_s=9.0)), is_best_effort=True).replica == "a"
    off = make_dispatcher(FakeReplica("a", backlog_s=9.0), admission=AdmissionConfig(enabled=False))
    assert dispatch(off).replica == "a"


def test_request_deadline_overrides_the_slo_scale():
    d = make_dispatcher(FakeReplica("a", backlog_s=2.0))
    assert dispatch(d, SLOTargets(deadline_s=10.0)).deadline.budget_s == 10.0


def test_full_waiting_queues_are_a_429():
    d = make_dispatcher(FakeReplica("a", num_waiting=4), admission=AdmissionConfig(max_waiting=4))
    with pytest.raises(ApiError) as info:
        dispatch(d)
    assert info.value.status == 429 and info.value.code == "queue_full"


def test_a_replica_that_does_not_answer_is_skipped_and_none_at_all_is_a_503():
    down, up = FakeReplica("down", is_down=True), FakeReplica("up", backlog_s=0.2)
    assert dispatch(make_dispatcher(down, up)).replica == "up"
    with pytest.raises(ApiError) as info:
        dispatch(make_dispatcher(FakeReplica("x", is_down=True)))
    assert info.value.status == 503


def test_a_replica_refusing_the_request_surfaces_its_status():
    bad = FakeReplica("a", first_chunk=Chunk(error="prompt too long for this replica", error_status=400))
    d = make_dispatcher(bad)
    with pytest.raises(ApiError) as info:
        dispatch(d)
    assert info.value.status == 400 and "too long" in info.value.message
    assert d.in_flight == {"a": 0}


def test_a_replica_that_is_full_by_the_time_the_request_lands_passes_it_on():
    """Estimates of concurrent requests are all taken before any lands; each replica confirms
    the admission on arrival, and one that no longer has room hands the request to the next."""
    late = Chunk(error="request refused: replica a can no longer finish it", error_status=429,
                 error_code="deadline_unattainable", retry_after_s=3)
    full, spare = FakeReplica("a", first_chunk=late), FakeReplica("b", backlog_s=0.2)
    d = make_dispatcher(full, spare)
    assert dispatch(d).replica == "b"
    assert full.sent and full.sent[0].admission is not None and d.in_flight == {"a": 0, "b": 1}
    assert spare.sent[0].admission.reserve == AdmissionConfig().headroom
    with pytest.raises(ApiError) as info:  # the only replica: its refusal is the answer
        dispatch(make_dispatcher(FakeReplica("a", first_chunk=late)))
    assert info.value.status == 429 and info.value.code == "deadline_unattainable"
    assert info.value.headers["Retry-After"] == "3" and "no longer finish" in info.value.message


def test_best_effort_requests_are_not_rechecked_by_the_replica():
    a = FakeReplica("a", backlog_s=9.0)
    dispatch(make_dispatcher(a), is_best_effort=True)
    off = FakeReplica("b")
    dispatch(make_dispatcher(off, admission=AdmissionConfig(enabled=False)))
    assert a.sent[0].admission is None and off.sent[0].admission is None


def test_baselines_route_without_slack():
    a, b = FakeReplica("a"), FakeReplica("b", backlog_s=0.5)
    d = make_dispatcher(a, b, policy="round_robin", admission=AdmissionConfig(enabled=False))
    assert [dispatch(d, request_id=f"r{i}").replica for i in range(4)] == ["a", "b", "a", "b"]


def test_abort_and_broadcast_reach_the_named_replicas():
    a, b = FakeReplica("a"), FakeReplica("b")
    d = make_dispatcher(a, b)

    async def run():
        d.abort_soon("b", "r9")
        await asyncio.sleep(0.01)
        return await d.broadcast("estimate", ["a"], prompt_len=3, params=SamplingParams())

    results = asyncio.run(run())
    assert b.aborted == ["r9"] and not a.aborted
    assert list(results) == ["a"] and isinstance(results["a"], Estimate)
