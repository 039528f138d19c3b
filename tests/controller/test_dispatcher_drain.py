"""The dispatcher's live replica set (what the controller changes), over fake handles, no Ray:
a draining replica gets no new request, even one whose estimates were on their way when the
drain began; a replica is forgotten only once nothing is in flight there."""

from __future__ import annotations

import asyncio
import time

import pytest

from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.serving.admission import SLOTargets
from dilaserve.serving.config import AdmissionConfig, RoutingConfig, SLOConfig
from dilaserve.serving.dispatcher import Dispatcher, ReplicaRef
from dilaserve.serving.load_counters import LoadCounters
from dilaserve.serving.messages import Chunk, Estimate


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _Stream:
    def __init__(self):
        self.chunks = [Chunk(is_accepted=True, threshold=0.9)]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self):
        pass


class FakeReplica:
    def __init__(self, name: str, backlog_s: float = 0.0, on_estimate=None):
        self.name, self.backlog_s, self.on_estimate, self.sent = name, backlog_s, on_estimate, []
        self.estimate = _Call(self._estimate)
        self.generate = _Call(self._generate)

    def options(self, **_):
        return self

    async def _estimate(self, prompt_len, params):
        if self.on_estimate is not None:
            self.on_estimate()
        await asyncio.sleep(0)
        finish = self.backlog_s + 0.1
        return Estimate(self.name, 0.1, finish, finish, 0.1, 0.9, 0, 0)

    def _generate(self, request):
        self.sent.append(request.request_id)
        return _Stream()


def make(*replicas) -> Dispatcher:
    return Dispatcher([ReplicaRef(r.name, "m", "v", r) for r in replicas], RoutingConfig(estimate_timeout_ms=500),
                      AdmissionConfig(), SLOConfig(overhead_ms=0.0))


def send(d: Dispatcher, request_id: str):
    return asyncio.run(d.dispatch(request_id, "m", [1, 2], SamplingParams(max_tokens=8), SLOTargets(),
                                  is_best_effort=True, arrival_s=time.monotonic(), arrival_unix_s=time.time()))


def test_a_draining_replica_gets_no_new_requests_and_is_removed_once_idle():
    fast, slow = FakeReplica("a"), FakeReplica("b", backlog_s=1.0)
    d = make(fast, slow)
    assert send(d, "r1").replica == "a"
    d.drain("a")
    assert send(d, "r2").replica == "b" and "r2" not in fast.sent
    with pytest.raises(ValueError, match="in flight"):
        d.remove("a")  # r1 has not finished
    d.release("a")
    d.remove("a")
    assert [r.name for r in d.replicas] == ["b"] and not d.draining
    assert [row["name"] for row in d.replica_table()] == ["b"]


def test_a_drain_that_begins_while_estimates_are_on_their_way_wins():
    d = None
    fast = FakeReplica("a", on_estimate=lambda: d.drain("a"))  # the drain lands mid-dispatch
    slow = FakeReplica("b", backlog_s=1.0)
    d = make(fast, slow)
    assert send(d, "r1").replica == "b"
    assert fast.sent == []


def test_added_replicas_are_routed_and_listed():
    d = make(FakeReplica("a", backlog_s=1.0))
    d.add_replica(ReplicaRef("c", "m", "v", FakeReplica("c")))
    assert send(d, "r1").replica == "c"
    table = {row["name"]: row for row in d.replica_table()}
    assert table["c"]["num_in_flight"] == 1 and not table["c"]["is_draining"]
    with pytest.raises(ValueError, match="already"):
        d.add_replica(ReplicaRef("c", "m", "v", FakeReplica("c")))


def test_load_counters_report_what_the_controller_differences():
    load = LoadCounters()
    for _ in range(3):
        load.arrive()
    load.refuse()
    load.finish(10, 4, True)
    load.finish(12, 6, False)
    report = load.report()
    assert (report["num_arrivals"], report["num_refused"], report["num_finished"], report["num_slo_met"]) == (3, 1, 2, 1)
    assert report["lengths"] == [[10, 4], [12, 6]] and report["epoch"] != LoadCounters().epoch
