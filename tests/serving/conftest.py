"""One local Ray instance with DiLaServe deployed, shared by every HTTP test of the session.

Real Ray, real Serve, real HTTP on 127.0.0.1, the real engine on a tiny random LLaDA model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dilaserve.serving.config import ServeConfig
from serving_helpers import HAS_ENGINE, NO_ENGINE_REASON, free_port, serving_config


@dataclass(frozen=True)
class Served:
    url: str
    config: ServeConfig
    model_dir: str


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    if not HAS_ENGINE:
        pytest.skip(NO_ENGINE_REASON)
    import ray
    from ray import serve

    from dilaserve.models.checkpoint import make_random_checkpoint
    from dilaserve.serving.app import build_app

    model_dir = str(make_random_checkpoint(tmp_path_factory.mktemp("serving-model"), "llada", seed=1))
    port = free_port()
    config = serving_config(model_dir, port)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", config, model_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
