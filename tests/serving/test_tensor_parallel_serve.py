"""A tensor-parallel replica behind real Ray Serve and HTTP, on CPUs (2 ranks, gloo).

Deployed as its own application (``/tp``) on the session's Ray instance, serving the same tiny
model as the main test application: greedy text must match the unsharded replicas'. Then its
worker process is killed: requests get a clean 503, never a hang, and Serve's health check
replaces the replica, which serves again.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from dilaserve.serving.config import parse_config
from serving_helpers import MODEL, needs_engine, wait_for

pytestmark = needs_engine

APP, ROUTE = "tp", "/tp"


@pytest.fixture(scope="module")
def tp_app(served):
    from ray import serve

    from dilaserve.serving.app import build_app

    config = parse_config({
        "app_name": APP,
        "models": [{"name": MODEL, "path": served.model_dir}],
        "variants": [{"name": "tp2", "model": MODEL, "tensor_parallel": 2, "num_cpus_per_replica": 0.25,
                      "threshold": 0.9, "engine": {"kv_memory_gib": 0.05}}],
        "admission": {"enabled": True},
        "defaults": {"max_tokens": 32, "block_length": 16},
    }, "tp test config")
    serve.run(build_app(config), name=APP, route_prefix=ROUTE)
    try:
        yield f"{served.url}{ROUTE}"
    finally:
        serve.delete(APP)


def complete(url: str, prompt: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0},
                      timeout=timeout)


def tp_replica(url: str) -> dict:
    (stats,) = httpx.get(f"{url}/v1/dilaserve/replicas", timeout=30).json()["replicas"].values()
    return stats


def test_tensor_parallel_replica_serves_what_the_unsharded_replicas_serve(served, tp_app):
    stats = tp_replica(tp_app)
    assert stats["tensor_parallel"] == 2 and len(stats["worker_pids"]) == 1
    for prompt in ("2+3=", "The quick brown fox", "7*8="):
        sharded, plain = complete(tp_app, prompt), complete(served.url, prompt)
        assert sharded.status_code == 200 and plain.status_code == 200, (sharded.text, plain.text)
        assert sharded.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
        assert sharded.json()["usage"]["completion_tokens"] > 0


def test_a_dead_worker_is_a_clean_503_then_serve_replaces_the_replica(tp_app):
    before = tp_replica(tp_app)
    os.kill(before["worker_pids"][0], signal.SIGKILL)
    # Until the replica is replaced, a request fails fast with a message (never hangs, never a 500).
    started = time.monotonic()
    r = complete(tp_app, "2+3=", timeout=60)
    assert time.monotonic() - started < 30
    if r.status_code != 200:  # it may already have been replaced
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
        assert "rank 1" in r.json()["error"]["message"], r.text  # says what failed

    def replaced_and_serving():
        try:
            stats = tp_replica(tp_app)  # the error's text while the replica does not answer
            return (isinstance(stats, dict) and stats["worker_pids"] != before["worker_pids"]
                    and complete(tp_app, "2+3=").status_code == 200)
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    assert wait_for(replaced_and_serving, 120, 1.0), "the replica was not replaced"
