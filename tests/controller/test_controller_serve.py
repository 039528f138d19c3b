"""The controller on real Ray Serve, over HTTP on 127.0.0.1: it scales 1 -> 2 replicas under
load and back without losing a request; a drain lets requests in flight finish before the
replica goes; a threshold change reaches the live replica without a restart; serving goes on
when the controller is killed, and a new one resumes.

The profiles are written for these tests: they say one replica at threshold 0.9 serves about
1.1 req/s of these requests (0.7: about 2 req/s), so the load below needs what it needs
whatever this machine's speed; every request is best effort, so none is refused.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

from dilaserve.controller.actions import AwaitDrained, AwaitReady, DrainReplica, RouteReplica, StartReplica, StopReplica
from dilaserve.controller.actor import get_controller, start_controller, stop_controller
from dilaserve.controller.apply import apply
from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.serve_cluster import ServeCluster

from controller_helpers import APP, LATENCY, MODEL, write_profiles

ONE_THRESHOLD = {"block_size": 16, "entries": [{"threshold": 0.9, "accuracy": 0.80, "tokens_per_step": 2.0}]}
TWO_THRESHOLDS = {"block_size": 16, "entries": [{"threshold": 0.9, "accuracy": 0.80, "tokens_per_step": 2.0},
                                                {"threshold": 0.7, "accuracy": 0.79, "tokens_per_step": 4.0}]}


def controller_config(profiles: str, **overrides) -> ControllerConfig:
    fields = dict(profiles_dir=profiles, slo_scale=3.0, quality_budget=1.0, tick_s=0.5, window_s=4.0,
                  period_s=2.0, min_interval_s=3.0, headroom=0.2, start_timeout_s=120.0, drain_timeout_s=30.0)
    return ControllerConfig(**{**fields, **overrides})


class Load:
    """Open-loop requests at a fixed rate from a background thread; every answer is recorded."""

    def __init__(self, url: str, rate_rps: float, max_tokens: int = 32, **fields):
        self.url, self.rate_rps, self.body = url, rate_rps, {"model": MODEL, "max_tokens": max_tokens,
                                                              "best_effort": True, **fields}
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(64)
        self._futures = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, i: int) -> dict:
        try:
            with httpx.Client(timeout=120) as c:
                r = c.post(f"{self.url}/v1/completions", json={**self.body, "prompt": f"{i}+{i}="})
            body = r.json()
            return {"status": r.status_code, "replica": body.get("dilaserve", {}).get("replica"),
                    "threshold": body.get("dilaserve", {}).get("threshold"),
                    "tokens": body.get("usage", {}).get("completion_tokens"), "end_s": time.monotonic()}
        except Exception as exc:  # a lost request: recorded, never raised
            return {"status": repr(exc), "replica": None, "threshold": None, "tokens": None, "end_s": time.monotonic()}

    def _run(self) -> None:
        i = 0
        start = time.monotonic()
        while not self._stop.is_set():
            self._futures.append(self._pool.submit(self._one, i))
            i += 1
            self._stop.wait(max(0.0, start + i / self.rate_rps - time.monotonic()))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.results = [f.result() for f in self._futures]
        self._pool.shutdown()

    def assert_none_lost(self, max_tokens: int) -> None:
        lost = [r for r in self.results if r["status"] != 200 or r["tokens"] != max_tokens]
        assert self.results and not lost, f"{len(lost)} of {len(self.results)} requests lost: {lost[:3]}"


def replicas(url: str) -> dict[str, dict]:
    return httpx.get(f"{url}/v1/dilaserve/replicas", timeout=30).json()["replicas"]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


def replica_apps() -> set[str]:
    return {n for n in serve.status().applications if n.startswith(f"{APP}--")}


def test_scales_from_one_to_two_replicas_under_load_and_back_without_losing_requests(controlled):
    profiles = write_profiles(controlled.profiles_root / "one", LATENCY, ONE_THRESHOLD)
    start_controller(controlled.config, controller_config(profiles, gpus=2))
    assert set(replicas(controlled.url)) == {"cpu-0"}
    with Load(controlled.url, rate_rps=3.0) as load:  # one replica is planned for ~1.1 req/s
        assert wait_until(lambda: set(replicas(controlled.url)) == {"cpu-0", "cpu-1"}, 60)
        time.sleep(5)  # keep the load on after the new replica is routed
    load.assert_none_lost(32)
    assert {"cpu-0", "cpu-1"} <= {r["replica"] for r in load.results}
    assert replica_apps() == {f"{APP}--cpu-0", f"{APP}--cpu-1"}
    with Load(controlled.url, rate_rps=0.4) as trickle:  # one replica is enough again
        assert wait_until(lambda: set(replicas(controlled.url)) == {"cpu-0"}, 60)
        time.sleep(2)
    trickle.assert_none_lost(32)
    assert wait_until(lambda: replica_apps() == {f"{APP}--cpu-0"}, 30)
    status = wait_until(lambda: (s := ray.get(get_controller().status.remote()))["num_reconfigurations"] >= 2
                        and s, 30)
    assert status["num_reconfigurations"] == 2, status["history"]
    assert stop_controller()


def test_a_drained_replica_finishes_its_requests_in_flight_before_it_is_removed(controlled):
    cluster = ServeCluster(controlled.config, MODEL)
    up = apply([StartReplica("cpu-9", "cpu", 0.9), AwaitReady(("cpu-9",)), RouteReplica("cpu-9")], cluster,
               start_timeout_s=120, drain_timeout_s=60)
    assert up.is_complete, up.error
    # Long requests, so that the drain begins while some run on cpu-9.
    with ThreadPoolExecutor(4) as pool:
        long = [pool.submit(Load(controlled.url, 1.0, max_tokens=700)._one, i) for i in range(4)]
        busy = wait_until(lambda: next((r for r in cluster.observe(0).cluster.replicas
                                        if r.name == "cpu-9" and r.num_in_flight > 0), None), 30, 0.05)
        assert busy is not None, "no request reached cpu-9"
        assert apply([DrainReplica("cpu-9")], cluster, start_timeout_s=1, drain_timeout_s=1).is_complete
        during = [Load(controlled.url, 1.0)._one(100 + i) for i in range(3)]  # new requests while draining
        down = apply([AwaitDrained(("cpu-9",)), StopReplica("cpu-9")], cluster, start_timeout_s=1,
                     drain_timeout_s=60)
        removed_s = time.monotonic()
        results = [f.result() for f in long]
    assert down.is_complete, down.error
    assert all(r["status"] == 200 and r["tokens"] == 700 for r in results), results
    on_drained = [r for r in results if r["replica"] == "cpu-9"]
    assert on_drained and all(r["end_s"] <= removed_s for r in on_drained)
    assert all(r["status"] == 200 and r["replica"] != "cpu-9" for r in during), during
    assert f"{APP}--cpu-9" not in replica_apps() and "cpu-9" not in replicas(controlled.url)


def _num_finished(url: str) -> int:
    return replicas(url)["cpu-0"]["engine"]["num_finished"]


def test_a_threshold_change_is_pushed_to_the_live_replica(controlled):
    profiles = write_profiles(controlled.profiles_root / "two", LATENCY, TWO_THRESHOLDS)
    assert replicas(controlled.url)["cpu-0"]["default_threshold"] == 0.9
    finished_before = _num_finished(controlled.url)
    start_controller(controlled.config, controller_config(profiles, gpus=1))
    with Load(controlled.url, rate_rps=1.6) as load:  # 0.9 serves ~1.1 req/s, 0.7 ~2 req/s
        assert wait_until(lambda: replicas(controlled.url)["cpu-0"]["default_threshold"] == 0.7, 40)
        time.sleep(2)
    load.assert_none_lost(32)
    assert {r["threshold"] for r in load.results} == {0.9, 0.7}  # requests before and after the push
    assert set(replicas(controlled.url)) == {"cpu-0"} and replica_apps() == {f"{APP}--cpu-0"}
    # The same engine (no restart): its count of finished requests went on growing.
    assert _num_finished(controlled.url) >= finished_before + len(load.results)


def test_serving_goes_on_when_the_controller_dies_and_a_new_one_resumes(controlled):
    handle = get_controller()
    assert handle is not None
    ray.kill(handle, no_restart=True)
    assert wait_until(lambda: get_controller() is None, 30)
    with Load(controlled.url, rate_rps=2.0) as load:  # served on the last plan: cpu-0 at 0.7
        time.sleep(5)
    load.assert_none_lost(32)
    assert {r["replica"] for r in load.results} == {"cpu-0"}
    assert {r["threshold"] for r in load.results} == {0.7}
    # A new controller starts from what it observes; at a light load it plans 0.9 again
    # (more accurate on the same GPU).
    profiles = str(controlled.profiles_root / "two")
    start_controller(controlled.config, controller_config(profiles, gpus=1))
    with Load(controlled.url, rate_rps=0.4) as light:
        assert wait_until(lambda: replicas(controlled.url)["cpu-0"]["default_threshold"] == 0.9, 40)
    light.assert_none_lost(32)
    history = ray.get(get_controller().status.remote())["history"]
    assert any(h["kind"] == "reconfigure" and "accuracy" in h["reason"] for h in history)


def test_a_sparse_kv_policy_reaches_the_live_replica_and_its_requests(controlled):
    """The controller's SetPolicy(kv_retention) on real Serve: the replica takes the retention
    live, its requests that leave it unset run sparse (the response says so) and decode in full;
    a request on another cache mode stays dense; setting None makes them dense again."""
    stop_controller(timeout_s=60)  # nothing else changes the policy meanwhile
    cluster = ServeCluster(controlled.config, MODEL)
    threshold = replicas(controlled.url)["cpu-0"]["default_threshold"]

    def complete(**fields) -> dict:
        body = {"model": MODEL, "prompt": "12+7=", "max_tokens": 32, "best_effort": True, **fields}
        r = httpx.post(f"{controlled.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 32
        return r.json()["dilaserve"]

    assert complete()["kv_retention"] is None
    cluster.set_policy("cpu-0", threshold, 0.5)
    assert replicas(controlled.url)["cpu-0"]["default_kv_retention"] == 0.5
    assert complete()["kv_retention"] == 0.5
    assert complete(cache="prefix")["kv_retention"] is None  # sparse KV is for the dual cache only
    cluster.set_policy("cpu-0", threshold, None)
    assert replicas(controlled.url)["cpu-0"]["default_kv_retention"] is None
    assert complete()["kv_retention"] is None
