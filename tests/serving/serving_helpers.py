"""Shared pieces of the serving tests: the test deployment's config and small helpers."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest

from dilaserve.serving.config import ServeConfig, parse_config

HAS_ENGINE = importlib.util.find_spec("dilaserve.engine.async_engine") is not None
NO_ENGINE_REASON = "dilaserve.engine.async_engine is not importable yet (the engine issue)"
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason=NO_ENGINE_REASON)
MODEL = "tiny-llada"
MAX_BODY_BYTES = 64 * 1024


def serving_config(model_dir: str, port: int) -> ServeConfig:
    """Two CPU replicas of a tiny model, so that routing has a choice, on 2 logical CPUs."""
    return parse_config({
        "models": [{"name": MODEL, "path": model_dir}],
        "variants": [{"name": "cpu", "model": MODEL, "num_replicas": 2, "num_cpus_per_replica": 0.5,
                      "threshold": 0.9, "engine": {"kv_memory_gib": 0.05}}],
        "routing": {"policy": "slack"},
        "admission": {"enabled": True},
        "http": {"host": "127.0.0.1", "port": port, "max_body_bytes": MAX_BODY_BYTES, "ingress_num_cpus": 0.25},
        "defaults": {"max_tokens": 32, "block_length": 16},
    }, "test config")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1):
    """Polls ``predicate`` until it returns something truthy; returns that, or the last value."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval_s)
