"""A controlled deployment on real Ray / Serve / HTTP (127.0.0.1) for the controller's Ray tests.

One replica of a tiny random LLaDA model in its own Serve application, the ingress at
``/ctl``. If another suite's Ray instance is up (the serving tests share one per session),
the deployment joins it under its own application names and route and leaves it running;
otherwise it starts a 2-CPU Ray instance and shuts it down afterwards.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from dilaserve.serving.config import ServeConfig

from controller_helpers import APP, ROUTE, controlled_config


@dataclass(frozen=True)
class Controlled:
    url: str  # base URL of the OpenAI API (…/ctl)
    config: ServeConfig
    profiles_root: Path  # tmp dir for the tests' profile directories


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("dilaserve.engine.async_engine") is None:
        pytest.skip("the engine is not importable")
    import ray
    from ray import serve

    from dilaserve.controller.actor import stop_controller
    from dilaserve.controller.deploy import deploy_controlled
    from dilaserve.models.checkpoint import make_random_checkpoint

    model_dir = str(make_random_checkpoint(tmp_path_factory.mktemp("controller-model"), "llada", seed=1))
    owns_ray = not ray.is_initialized()
    if owns_ray:
        port = _free_port()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        from ray.serve.context import _get_global_client

        serve.start()
        port = _get_global_client().http_config.port
    config = controlled_config(model_dir, port)
    try:
        deploy_controlled(config, route_prefix=ROUTE)
        yield Controlled(f"http://127.0.0.1:{port}{ROUTE}", config, tmp_path_factory.mktemp("profiles"))
    finally:
        stop_controller(timeout_s=60)
        if owns_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            for name in list(serve.status().applications):
                if name == APP or name.startswith(f"{APP}--"):
                    serve.delete(name)
