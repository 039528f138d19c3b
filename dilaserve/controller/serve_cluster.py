"""The cluster as the controller sees and changes it on Ray Serve (the Ray side, kept thin).

Reads: the ingress's ``load_report`` (counters, lengths, the routed replicas with their
in-flight counts and stats) and ``serve.status()`` (which replica applications exist and
whether they run). Writes: ``serve.run_many`` / ``serve.delete`` of a replica's own
application (``deploy.py``), the ingress's ``add_replica`` / ``drain_replica`` /
``remove_replica``, and a replica's ``set_policy`` (threshold and sparse-KV retention).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ray import serve

from dilaserve.controller.deploy import SEPARATOR, replica_app_name, replica_application, replica_deployment_name
from dilaserve.controller.observation import (
    FAILED, MISSING, READY, STARTING, ClusterView, LoadSnapshot, Observation, ReplicaView,
)
from dilaserve.serving.config import ServeConfig

log = logging.getLogger(__name__)

_APP_STATUS = {"RUNNING": READY, "DEPLOYING": STARTING, "NOT_STARTED": STARTING, "DEPLOY_FAILED": FAILED,
               "UNHEALTHY": FAILED, "DELETING": MISSING}


class ServeCluster:
    def __init__(self, config: ServeConfig, model: str, call_timeout_s: float = 30.0):
        self.config, self.model, self.call_timeout_s = config, model, call_timeout_s
        self.variants = {v.name: v for v in config.variants if v.model == model}
        self._ingress = None

    # -- reading ---------------------------------------------------------------------------
    @property
    def ingress(self):
        if self._ingress is None:
            self._ingress = serve.get_deployment_handle("ingress", app_name=self.config.app_name)
        return self._ingress

    def _call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.ingress, method).remote(*args, **kwargs).result(timeout_s=self.call_timeout_s)

    def _replica_apps(self) -> dict[str, str]:
        """Replica name -> status of every replica application of this config."""
        prefix = f"{self.config.app_name}{SEPARATOR}"
        return {name[len(prefix):]: _APP_STATUS.get(str(getattr(app.status, "value", app.status)), STARTING)
                for name, app in serve.status().applications.items() if name.startswith(prefix)}

    def _variant_of(self, replica: str) -> str | None:
        variant = replica.rsplit("-", 1)[0]
        return variant if variant in self.variants else None

    def observe(self, now_s: float) -> Observation:
        report = self._call("load_report")
        apps = self._replica_apps()
        views = []
        for row in report["replicas"]:
            if row["model"] != self.model or row["variant"] not in self.variants:
                continue
            name, stats = row["name"], row["stats"]
            is_removable = row.get("app_name") == replica_app_name(self.config.app_name, name)
            if is_removable and name not in apps:
                status = MISSING
            elif is_removable and apps[name] == FAILED:
                status = FAILED
            else:
                status = READY if isinstance(stats, dict) else STARTING
            engine = stats.get("engine", {}) if isinstance(stats, dict) else {}
            views.append(ReplicaView(
                name, row["variant"], self.variants[row["variant"]].tensor_parallel,
                stats.get("default_threshold") if isinstance(stats, dict) else None, status,
                is_routed=True, is_draining=bool(row["is_draining"]), is_removable=is_removable,
                num_in_flight=int(row["num_in_flight"]),
                num_active=int(engine.get("num_running", 0)) + int(engine.get("num_waiting", 0)),
                app_name=row.get("app_name"), deployment_name=row.get("deployment_name"),
                kv_retention=stats.get("default_kv_retention") if isinstance(stats, dict) else None))
        routed = {v.name for v in views}
        for name, status in apps.items():
            variant = self._variant_of(name)
            if name in routed or variant is None:
                continue
            views.append(ReplicaView(name, variant, self.variants[variant].tensor_parallel, None, status,
                                     app_name=replica_app_name(self.config.app_name, name),
                                     deployment_name=replica_deployment_name(name)))
        return Observation(now_s, ClusterView(tuple(views)), LoadSnapshot.from_report(now_s, report))

    def replica_status(self, names: Sequence[str]) -> dict[str, str]:
        apps = self._replica_apps()
        return {n: apps.get(n, MISSING) for n in names}

    def is_drained(self, name: str) -> bool:
        row = next((r for r in self._call("load_report")["replicas"] if r["name"] == name), None)
        if row is None:
            return True
        stats = row["stats"]
        if not isinstance(stats, dict):
            return False  # cannot tell; ask again
        engine = stats["engine"]
        return row["num_in_flight"] == 0 and engine["num_running"] == 0 and engine["num_waiting"] == 0

    # -- changing ----------------------------------------------------------------------------
    def start_replica(self, name: str, variant: str, threshold: float, kv_retention: float | None = None) -> None:
        app = replica_application(self.config, name, self.variants[variant], threshold, kv_retention)
        serve.run_many([serve.RunTarget(app, name=replica_app_name(self.config.app_name, name), route_prefix=None)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)

    def route(self, name: str) -> None:
        variant = self._variant_of(name)
        self._call("add_replica", name, self.model, variant, replica_deployment_name(name),
                   replica_app_name(self.config.app_name, name))

    def unroute(self, name: str) -> None:
        self._call("remove_replica", name)

    def drain(self, name: str) -> None:
        self._call("drain_replica", name)

    def set_policy(self, name: str, threshold: float, kv_retention: float | None = None) -> None:
        row = next(r for r in self._call("load_report")["replicas"] if r["name"] == name)
        handle = serve.get_deployment_handle(row["deployment_name"], app_name=row["app_name"])
        handle.set_policy.remote(threshold=threshold, kv_retention=kv_retention).result(timeout_s=self.call_timeout_s)

    def stop_replica(self, name: str) -> None:
        rows = {r["name"]: r for r in self._call("load_report")["replicas"]}
        if name in rows:
            self._call("remove_replica", name)
        app = replica_app_name(self.config.app_name, name)
        if name in rows and rows[name].get("app_name") != app:
            log.warning("replica %s lives in the main application; it is no longer routed but keeps running", name)
            return
        if app in serve.status().applications:
            serve.delete(app)
