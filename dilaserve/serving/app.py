"""Building and running the Serve application from a serving config.

- ``build_app(config)``: the application: one ``Replica`` deployment per replica of every
  variant (GPUs reserved per the variant; a tensor-parallel replica gets all its ranks' GPUs in
  one STRICT_PACK placement group bundle), and the ``Ingress`` bound to handles of all of them.
- ``app_builder(args)``: the import path for ``serve run`` / ``serve deploy``
  (``dilaserve.serving.app:app_builder``); ``args`` hold ``config: <yaml path>`` or the config
  itself inline.
- ``run_local(config)``: what ``dilaserve serve`` does: connect to a running Ray instance or
  start a small local one, start Serve's HTTP proxy on the configured host and port, deploy.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import socket
from typing import Any, Mapping

from ray import serve

from dilaserve.errors import DeployError
from dilaserve.serving.config import ServeConfig, VariantConfig, default_config, load_config, parse_config
from dilaserve.serving.ingress import Ingress
from dilaserve.serving.replica import Replica

logger = logging.getLogger(__name__)


def replica_options(variant: VariantConfig) -> dict[str, Any]:
    """Serve deployment options of one replica of ``variant``."""
    options: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": variant.max_ongoing_requests}
    cpus = variant.num_cpus_per_replica
    gpus = variant.num_gpus_per_replica
    options["ray_actor_options"] = {"num_cpus": cpus, "num_gpus": gpus}
    if variant.tensor_parallel > 1:
        # One bundle holding every rank's GPU, on one node: the replica runs rank 0 and starts
        # the other ranks as its own worker processes (engine/tensor_parallel.py), which see
        # the same GPUs.
        options["placement_group_bundles"] = [{"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def build_app(config: ServeConfig) -> serve.Application:
    max_waiting = config.admission.max_waiting if config.admission.enabled else None
    handles = {
        name: Replica.options(name=f"replica-{name}", **replica_options(variant)).bind(
            name, config.model(variant.model), variant, max_waiting
        )
        for name, variant in config.replica_names()
    }
    ingress = Ingress.options(name="ingress", ray_actor_options={"num_cpus": config.http.ingress_num_cpus})
    return ingress.bind(config, handles)


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """``serve run dilaserve.serving.app:app_builder config=examples/serve_cpu.yaml``."""
    args = dict(args or {})
    if "config" in args:
        return build_app(load_config(args["config"]))
    if args:
        return build_app(parse_config(args, "application args"))
    return build_app(default_config())


def local_num_cpus(config: ServeConfig) -> int:
    """Logical CPUs for a local Ray instance: what the deployments ask for, at least 2."""
    wanted = config.http.ingress_num_cpus + sum(v.num_cpus_per_replica * v.num_replicas for v in config.variants)
    return max(2, math.ceil(wanted))


def run_local(config: ServeConfig, ray_address: str | None = None) -> tuple[str, bool]:
    """Deploys ``config`` on a running Ray instance, or a new local one. Returns the base URL
    and whether this call started Ray (then the caller owns its shutdown)."""
    import ray

    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=ray_address or "auto", logging_level=logging.WARNING)
            logger.info("connected to the running Ray instance")
        except ConnectionError:
            if ray_address:
                raise
            check_port_free(config.http.host, config.http.port)  # no Serve of ours can hold it yet
            ray.init(num_cpus=local_num_cpus(config), include_dashboard=False, logging_level=logging.WARNING)
            started = True
            logger.info("started a local Ray instance")
            try:
                check_local_gpus(config, ray.cluster_resources().get("GPU", 0.0))
            except DeployError:
                ray.shutdown()
                raise
    host, port = config.http.host, config.http.port
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
    except RuntimeError:
        # Serve says only "Failed to update the deployments [...]" (the replicas' tracebacks
        # scroll past in the log): name each failed deployment and its root cause, and leave
        # nothing running.
        failures = deploy_failures(config.app_name)
        try:
            serve.delete(config.app_name)
        finally:
            if started:
                serve.shutdown()
                ray.shutdown()
        if not failures:
            raise
        raise DeployError(f"{config.app_name!r} could not start: " + "; ".join(failures)) from None
    return f"http://{host}:{port}", started


def check_port_free(host: str, port: int) -> None:
    """Refuses a port something else listens on (Serve's proxy would fail to bind it, with a
    traceback, after Ray has started)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = ("is another server running there? Choose another port with --port (or http.port in the config)"
                    if exc.errno == errno.EADDRINUSE else "check --host (or http.host in the config)")
            raise DeployError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None


def check_local_gpus(config: ServeConfig, gpus: float) -> None:
    """Refuses a config whose replicas need more GPUs than a local Ray instance has: Serve
    would wait for them forever (a joined cluster may add nodes, so only a local start checks)."""
    for v in config.variants:
        if v.num_replicas and v.num_gpus_per_replica > gpus:
            raise DeployError(
                f"variant {v.name!r} needs {v.num_gpus_per_replica:g} GPU(s) per replica and this machine has "
                f"{gpus:g} (as Ray sees it); serve a CPU model here (models: device: cpu) or start on a GPU machine")
    wanted = sum(v.num_gpus_per_replica * v.num_replicas for v in config.variants)
    if wanted > gpus:
        raise DeployError(f"the variants' replicas need {wanted:g} GPUs together and this machine has {gpus:g}; "
                          "lower num_replicas")


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b:?.*)$")


def root_cause(message: str) -> str:
    """The last exception line of a Serve deployment message (a replica constructor's
    traceback): the innermost error, which a traceback prints last."""
    lines = [m.group(1).strip() for m in map(_EXCEPTION_LINE.match, message.splitlines()) if m]
    lines = [line for line in lines if not line.endswith("Traceback (most recent call last):")]
    text = lines[-1] if lines else (message.strip().splitlines() or ["no message"])[0]
    return text if len(text) <= 400 else text[:397] + "..."


def deploy_failures(app_name: str) -> list[str]:
    """'<deployment> failed to start: <root cause>' for each failed deployment of the app."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the controller itself is gone: nothing more to say than Serve's error
        return []
    failures = []
    for name, deployment in (app.deployments.items() if app else ()):
        status = getattr(deployment.status, "value", str(deployment.status))
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            failures.append(f"{name} failed to start: {root_cause(deployment.message or '')}")
    return failures
