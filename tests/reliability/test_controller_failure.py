"""The controller crashes (its actor is killed, and Ray restarts it): serving goes on with the
last plan meanwhile, and the restarted controller resumes planning.

``tests/controller/test_controller_serve.py`` covers a controller that is stopped for good and
a new one started by hand; this covers the crash path: ``ray.kill(..., no_restart=False)``
and ``max_restarts=-1`` bringing the same named actor back by itself. The deployment is the
controller tests' one (``controller_helpers``), under its own application and controller
names so that it never meets theirs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
from controller_helpers import LATENCY, MODEL, controlled_config, write_profiles  # noqa: E402

from dilaserve.controller.config import ControllerConfig  # noqa: E402

from .reliability_helpers import run_open_loop, tally, wait_until  # noqa: E402

APP = "relctl"
ROUTE = "/relctl"
CONTROLLER = "rel-controller"
TWO_THRESHOLDS = {"block_size": 16, "entries": [{"threshold": 0.9, "accuracy": 0.80, "tokens_per_step": 2.0},
                                                {"threshold": 0.7, "accuracy": 0.79, "tokens_per_step": 4.0}]}


@pytest.fixture(scope="module")
def controlled(cluster, tmp_path_factory):
    from ray import serve

    from dilaserve.controller.actor import stop_controller
    from dilaserve.controller.deploy import deploy_controlled
    from dilaserve.models.checkpoint import make_random_checkpoint

    model_dir = str(make_random_checkpoint(tmp_path_factory.mktemp("relctl-model"), "llada", seed=1))
    config = dataclasses.replace(controlled_config(model_dir, cluster.port), app_name=APP)
    deploy_controlled(config, route_prefix=ROUTE)
    try:
        yield config, f"http://127.0.0.1:{cluster.port}{ROUTE}", tmp_path_factory.mktemp("relctl-profiles")
    finally:
        stop_controller(CONTROLLER, timeout_s=60)
        for name in list(serve.status().applications):
            if name == APP or name.startswith(f"{APP}--"):
                serve.delete(name)


def body(i: int) -> dict:
    return {"model": MODEL, "prompt": f"{i}+{i}=", "max_tokens": 32, "best_effort": True}


def threshold(url: str) -> float:
    return httpx.get(f"{url}/v1/dilaserve/replicas", timeout=30).json()["replicas"]["cpu-0"]["default_threshold"]


def status(handle) -> dict:
    return ray.get(handle.status.remote(), timeout=10)


def test_a_crashed_controller_is_restarted_and_resumes_planning_while_serving_goes_on(controlled):
    from dilaserve.controller.actor import get_controller, start_controller

    config, url, profiles_root = controlled
    profiles = write_profiles(profiles_root / "two", LATENCY, TWO_THRESHOLDS)
    ctl_config = ControllerConfig(profiles_dir=profiles, gpus=1, slo_scale=3.0, quality_budget=1.0, tick_s=0.5,
                                  window_s=4.0, period_s=2.0, min_interval_s=3.0, headroom=0.2,
                                  start_timeout_s=120.0, drain_timeout_s=30.0)
    handle = start_controller(config, ctl_config, name=CONTROLLER)
    # Under ~1.6 req/s the plan is threshold 0.7 (0.9 serves ~1.1 req/s by the profile).
    load = run_open_loop(url, 1.6, 12.0, body, headers={})
    assert threshold(url) == 0.7, status(handle)["history"][-3:]
    assert all(o.kind == "ok" for o in load), tally(load)
    history_before = len(status(handle)["history"])
    assert history_before > 0

    ray.kill(handle, no_restart=False)  # a crash: Ray restarts the actor (max_restarts=-1)
    killed_at = time.monotonic()
    during = run_open_loop(url, 1.6, 3.0, body, headers={})  # served on the last plan meanwhile
    t = tally(during)
    assert t.sent == t.answered == t.ok, t
    assert {o.replica for o in during} == {"cpu-0"}

    restarted = get_controller(CONTROLLER, "dilaserve")
    assert restarted is not None
    fresh = wait_until(lambda: status(restarted), 60, 0.5)
    assert fresh and len(fresh["history"]) < history_before + 5, "the actor was not restarted (history kept)"
    restart_s = time.monotonic() - killed_at
    # It plans again: at a light load it moves the threshold back to the more accurate 0.9.
    light = run_open_loop(url, 0.4, 2.0, body, headers={})
    assert wait_until(lambda: threshold(url) == 0.9, 60, 0.5), status(restarted)["history"][-3:]
    resumed_s = time.monotonic() - killed_at
    light_after = run_open_loop(url, 0.4, 2.0, body, headers={})
    assert all(o.kind == "ok" for o in light + light_after)
    assert any(h["kind"] == "reconfigure" for h in status(restarted)["history"])
    print(f"\ncontroller: answering again {restart_s:.1f} s after the crash, re-planned (threshold 0.7 -> 0.9) "
          f"{resumed_s:.1f} s after; {t.sent} requests sent during the restart, {t.ok} answered")
