"""Deploying the serving config so a controller can scale it: every replica in a Serve
application of its own, the ingress in the main one.

Why not one application: Serve (2.60) gives every deployment of an application a new random
version on each ``serve.run``, so redeploying the application with one more replica restarts
*every* replica and the ingress (each one reloads its model; requests running on them have
``graceful_shutdown_timeout_s`` to finish, then are cut). A replica in an application of its
own can be started and deleted without touching any other, and the ingress adds or drops its
handle live (``Ingress.add_replica`` / ``drain_replica`` / ``remove_replica``).
"""

from __future__ import annotations

import dataclasses

from ray import serve

from dilaserve.serving.app import replica_options
from dilaserve.serving.config import ServeConfig, VariantConfig
from dilaserve.serving.ingress import Ingress
from dilaserve.serving.replica import Replica

SEPARATOR = "--"  # <app>--<replica>: a replica's own application


def replica_app_name(app_name: str, replica: str) -> str:
    return f"{app_name}{SEPARATOR}{replica}"


def replica_deployment_name(replica: str) -> str:
    return f"replica-{replica}"  # as build_app names it


def replica_application(config: ServeConfig, name: str, variant: VariantConfig, threshold: float | None = None,
                        kv_retention: float | None = None) -> serve.Application:
    """One replica of ``variant`` (at ``threshold`` and sparse-KV ``kv_retention`` when given)
    as an application of its own."""
    if threshold is not None:
        variant = dataclasses.replace(variant, threshold=threshold)
    if kv_retention is not None:
        variant = dataclasses.replace(variant, kv_retention=kv_retention)
    max_waiting = config.admission.max_waiting if config.admission.enabled else None
    return Replica.options(name=replica_deployment_name(name), **replica_options(variant)).bind(
        name, config.model(variant.model), variant, max_waiting)


def deploy_controlled(config: ServeConfig, route_prefix: str = "/") -> serve.handle.DeploymentHandle:
    """Deploys ``config`` for a controller: its replicas (each its own application, started
    together, waited for), then the ingress bound to their handles. Returns the ingress handle."""
    names = config.replica_names()
    serve.run_many([
        serve.RunTarget(replica_application(config, name, variant), name=replica_app_name(config.app_name, name),
                        route_prefix=None)
        for name, variant in names
    ])
    handles = {name: serve.get_deployment_handle(replica_deployment_name(name),
                                                 app_name=replica_app_name(config.app_name, name))
               for name, _ in names}
    ingress = Ingress.options(name="ingress", ray_actor_options={"num_cpus": config.http.ingress_num_cpus})
    return serve.run(ingress.bind(config, handles), name=config.app_name, route_prefix=route_prefix)
