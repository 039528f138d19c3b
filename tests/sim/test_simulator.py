"""The simulator end to end: determinism, conservation, and the behaviour a cluster should show."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import StepCost
from dilaserve.replay.metrics import compute_metrics
from dilaserve.replay.records import Status, load_records, save_records
from dilaserve.replay.trace import Trace, TraceRequest
from dilaserve.serving.config import AdmissionConfig, RoutingConfig
from dilaserve.sim import ClusterConfig, ReplicaGroup, SimPolicies, simulate
from tests.sim.helpers import poisson_trace

FIDELITIES = ("step", "fast")


def policies(fidelity: str, policy: str = "slack", admission: bool = True, **kwargs) -> SimPolicies:
    return SimPolicies(routing=RoutingConfig(policy=policy), admission=AdmissionConfig(enabled=admission),
                       fidelity=fidelity, **kwargs)


def attainment(records) -> float:
    return compute_metrics(records).slo_attainment


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_same_seed_same_records(fidelity):
    trace = poisson_trace(80, 300, seed=3)
    cluster = ClusterConfig.homogeneous(3)
    runs = [simulate(trace, cluster, policies(fidelity, "power_of_two", seed=5)) for _ in range(2)]
    assert [r.to_dict() for r in runs[0]] == [r.to_dict() for r in runs[1]]


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_every_request_ends_finished_refused_or_rejected(fidelity):
    # Overload (refusals), one request too long for a replica's KV pages (rejected), the rest served.
    requests = list(poisson_trace(400, 400, seed=1))
    requests[17] = TraceRequest(requests[17].arrival_s, 5000, 64)
    trace = Trace(tuple(requests))
    cluster = ClusterConfig.homogeneous(2, engine=EngineConfig(num_pages=256, page_size=16))
    records = simulate(trace, cluster, policies(fidelity))
    assert [r.request_id for r in records] == list(range(len(trace)))
    by_status = {s: [r for r in records if r.status is s] for s in Status}
    assert len(by_status[Status.OK]) + len(by_status[Status.REFUSED]) + len(by_status[Status.ERROR]) == len(trace)
    assert [r.request_id for r in by_status[Status.ERROR]] == [17]
    assert len(by_status[Status.REFUSED]) > 100 and len(by_status[Status.OK]) > 30
    for r, t in zip(records, trace):
        assert (r.arrival_s, r.prompt_tokens, r.output_tokens_requested) == t
        if r.status is Status.OK:
            assert r.arrival_s < r.first_token_s <= r.finish_s
            assert r.output_tokens_received == r.output_tokens_requested
        else:
            assert r.finish_s == r.arrival_s and r.output_tokens_received == 0


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_more_replicas_meet_more_deadlines(fidelity):
    trace = poisson_trace(120, 500, seed=2)  # about twice what two replicas sustain
    results = [attainment(simulate(trace, ClusterConfig.homogeneous(n), policies(fidelity))) for n in (2, 4, 8)]
    assert results[0] < results[1] < results[2]
    assert results[0] < 0.8 and results[2] > 0.97


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_admission_refuses_under_overload(fidelity):
    trace = poisson_trace(150, 500, seed=4)  # about 2.5x what two replicas sustain
    cluster = ClusterConfig.homogeneous(2)
    with_admission = compute_metrics(simulate(trace, cluster, policies(fidelity, admission=True)))
    without = compute_metrics(simulate(trace, cluster, policies(fidelity, admission=False)))
    assert with_admission.refused_share > 0.5 and without.refused_share == 0
    assert with_admission.slo_attainment > without.slo_attainment
    assert with_admission.e2e_s.p99 < without.e2e_s.p99 / 2
    light = compute_metrics(simulate(poisson_trace(30, 300, seed=4), cluster, policies(fidelity, admission=True)))
    assert light.refused_share < 0.01


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_slack_routing_beats_round_robin_on_a_heterogeneous_cluster(fidelity):
    fast = StepCost()
    slow = StepCost(3 * fast.fixed_s, 3 * fast.per_token_s, 3 * fast.per_context_s)
    cluster = ClusterConfig((ReplicaGroup("fast", 2, fast), ReplicaGroup("slow", 2, slow)))
    trace = poisson_trace(60, 500, seed=0)
    slack = attainment(simulate(trace, cluster, policies(fidelity, "slack", admission=False)))
    round_robin = attainment(simulate(trace, cluster, policies(fidelity, "round_robin", admission=False)))
    assert slack > 0.98 and slack > round_robin + 0.2


def test_records_feed_the_replay_metrics_and_files(tmp_path):
    records = simulate(poisson_trace(50, 100), ClusterConfig.homogeneous(2), SimPolicies(system="sim-test"))
    loaded = load_records(save_records(records, tmp_path / "sim.jsonl"))
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in records]
    metrics = compute_metrics(loaded)
    assert metrics.system == "sim-test" and metrics.num_requests == 100 and metrics.e2e_s is not None


def test_simulator_imports_neither_torch_nor_ray():
    code = ("import sys; import dilaserve.sim, dilaserve.cli.simulate; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
