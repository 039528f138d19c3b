"""One local Ray cluster for the reliability tests, and the deployment most of them share.

Real Ray, real Serve, real HTTP on 127.0.0.1, the real engine on a tiny random LLaDA model
(256 positions, so that no fuzzed request runs long). The deployment is the serving tests'
(``serving_helpers.serving_config``: two CPU replicas, slack routing, admission on) under its
own application name and route, with an API key and a prompt-length limit. If a Ray instance
is already up (another suite's), it joins it and leaves it running; otherwise it starts a
2-CPU one and shuts it down when the package is done.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import HAS_ENGINE, NO_ENGINE_REASON, free_port, serving_config  # noqa: E402

from dilaserve.serving.config import ServeConfig  # noqa: E402

from .reliability_helpers import API_KEY, is_idle, wait_until  # noqa: E402

torch.set_num_threads(1)
APP = "rel"
ROUTE = "/rel"
MAX_PROMPT_TOKENS = 200
MAX_POSITIONS = 256


@dataclass(frozen=True)
class Cluster:
    port: int


@dataclass(frozen=True)
class Deployment:
    url: str  # base URL of the OpenAI API (…/rel)
    config: ServeConfig
    model_dir: str


@pytest.fixture(scope="package")
def cluster():
    if not HAS_ENGINE:
        pytest.skip(NO_ENGINE_REASON)
    import ray
    from ray import serve

    owns_ray = not ray.is_initialized()
    if owns_ray:
        port = free_port()
        # No per-request access logs, none forwarded to the driver: on 2 cores they cost what
        # the load tests measure.
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
    else:
        from ray.serve.context import _get_global_client

        serve.start()
        port = _get_global_client().http_config.port
    try:
        yield Cluster(port)
    finally:
        if owns_ray:
            serve.shutdown()
            ray.shutdown()


def reliability_config(model_dir: str, port: int) -> ServeConfig:
    base = serving_config(model_dir, port)
    variants = tuple(dataclasses.replace(v, num_cpus_per_replica=0.25) for v in base.variants)
    http = dataclasses.replace(base.http, api_key=API_KEY, max_prompt_tokens=MAX_PROMPT_TOKENS, ingress_num_cpus=0.1)
    return dataclasses.replace(base, app_name=APP, variants=variants, http=http)


@pytest.fixture(scope="package")
def deployment(cluster, tmp_path_factory):
    from ray import serve

    d = deploy(cluster, tmp_path_factory.mktemp("reliability-model"), APP, ROUTE, max_positions=MAX_POSITIONS)
    try:
        yield d
    finally:
        serve.delete(APP)


def deploy(cluster, directory, app: str, route: str, num_replicas: int = 2, **model) -> Deployment:
    """The reliability config for a random LLaDA model of the given shape."""
    from ray import serve

    from dilaserve.models.checkpoint import make_random_checkpoint
    from dilaserve.serving.app import build_app

    model_dir = str(make_random_checkpoint(directory, "llada", seed=1, **model))
    config = reliability_config(model_dir, cluster.port)
    variants = tuple(dataclasses.replace(v, num_replicas=num_replicas) for v in config.variants)
    config = dataclasses.replace(config, app_name=app, variants=variants)
    serve.run(build_app(config), name=app, route_prefix=route)
    return Deployment(f"http://127.0.0.1:{cluster.port}{route}", config, model_dir)


@pytest.fixture(scope="module")
def heavy(cluster, tmp_path_factory):
    """One replica of a model that spends its time in the engine (hidden 256, 4 layers): the
    overload and soak tests saturate it at a request rate that the HTTP front end (proxy,
    ingress, client) handles with ease on the other core, as on a GPU cluster."""
    from ray import serve

    d = deploy(cluster, tmp_path_factory.mktemp("heavy-model"), "rel-heavy", "/rel-heavy", 1, hidden_size=256,
               num_layers=4, num_heads=4, intermediate_size=1024, max_positions=MAX_POSITIONS)
    try:
        yield d
    finally:
        serve.delete("rel-heavy")


@pytest.fixture()
def idle(deployment):
    """The shared deployment, once every replica is idle again (a test leaves load behind)."""
    assert wait_until(lambda: is_idle(deployment.url), 120), "the replicas did not become idle"
    return deployment
