"""The controller as a detached Ray actor: it outlives the driver that started it.

The actor runs ``Controller.tick`` on a thread every ``tick_s``; ``status()`` answers from
another. It holds no request state, so killing it leaves serving exactly as it is (the
ingress and replicas run the last plan); a new actor (or Ray restarting this one, which
``max_restarts=-1`` asks for after a crash) starts from what it observes: it routes replicas
that run but are not routed, finishes drains, and plans again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from dilaserve.controller.config import ControllerConfig
from dilaserve.controller.controller import Controller
from dilaserve.controller.decision import Planning
from dilaserve.planner import PlannerOptions, load_profile_set
from dilaserve.serving.config import ServeConfig

log = logging.getLogger(__name__)

CONTROLLER_NAME = "dilaserve-controller"
NAMESPACE = "dilaserve"


def build_controller(serve_config: ServeConfig, config: ControllerConfig) -> Controller:
    from dilaserve.controller.serve_cluster import ServeCluster

    model = config.model or serve_config.models[0].name
    variants: dict[int, str] = {}
    for v in serve_config.variants:
        if v.model == model:
            variants.setdefault(v.tensor_parallel, v.name)  # the first variant of each degree
    if not variants:
        raise ValueError(f"no variant serves model {model!r}")
    planning = Planning.for_degrees(
        load_profile_set(config.profiles_dir), list(variants), gpus=config.gpus,
        slo_scale=config.slo_scale or serve_config.slo.slo_scale, quality_budget=config.quality_budget,
        options=PlannerOptions(solver=config.solver))
    return Controller(config, ServeCluster(serve_config, model), planning, variants)


class ControllerActor:
    def __init__(self, serve_config: ServeConfig, config: ControllerConfig):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.controller = build_controller(serve_config, config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dilaserve-controller", daemon=True)
        self._thread.start()
        log.info("controller started: %s", config)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.controller.tick()
            except Exception:  # the cluster may be mid-change or unreachable; look again next tick
                log.exception("controller tick failed")
            self._stop.wait(self.controller.config.tick_s)

    def status(self) -> dict[str, Any]:
        return {**self.controller.status(), "is_running": self._thread.is_alive()}

    def stop(self) -> None:
        """Stops ticking after the current tick (serving goes on as it is)."""
        self._stop.set()
        self._thread.join(timeout=self.controller.config.drain_timeout_s + 60)


def start_controller(serve_config: ServeConfig, config: ControllerConfig, *, name: str = CONTROLLER_NAME,
                     namespace: str = NAMESPACE):
    """The running controller of this name, or a new detached one."""
    actor = ray.remote(ControllerActor).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1, num_cpus=0,
        max_concurrency=4)
    return actor.remote(serve_config, config)


def get_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE):
    """The controller's actor handle, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def stop_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE, timeout_s: float = 300.0) -> bool:
    """Stops the loop (letting a reconfiguration under way finish) and ends the actor."""
    handle = get_controller(name, namespace)
    if handle is None:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
    return True
