"""``dilaserve control``: start, inspect and stop the detached controller.

    dilaserve control start --config serve.yaml --gpus 8 [--profiles DIR] [--deploy] [--settings c.yaml]
    dilaserve control status [--json]
    dilaserve control stop

``start --deploy`` first deploys the serving config the way a controller can scale it (each
replica in a Serve application of its own); without it the application must already be
deployed so (``dilaserve.controller.deploy.deploy_controlled``). The controller outlives this
command. Until ``control`` is listed in ``dilaserve.cli.SUBCOMMANDS`` it also runs as
``python -m dilaserve.cli.control``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

_FLAGS = {  # flag -> ControllerConfig field
    "gpus": "gpus", "profiles": "profiles_dir", "slo_scale": "slo_scale", "quality_budget": "quality_budget",
    "tick": "tick_s", "period": "period_s", "window": "window_s", "min_interval": "min_interval_s",
    "min_replicas": "min_replicas",
}


def add_parser(sub) -> None:
    p = sub.add_parser("control", help="the controller that re-plans and rescales a running deployment")
    actions = p.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="start the detached controller (returns at once)")
    start.add_argument("--config", required=True, help="serving config YAML of the deployment to control")
    start.add_argument("--settings", help="controller settings YAML (the fields of ControllerConfig)")
    start.add_argument("--gpus", type=int, help="devices the plan may use (on CPU: degree-1 replica slots)")
    start.add_argument("--profiles", help="directory with latency.json and quality.json (default: illustrative)")
    start.add_argument("--slo-scale", type=float, help="default: the serving config's slo.slo_scale")
    start.add_argument("--quality-budget", type=float, help="accuracy points (default 1)")
    start.add_argument("--tick", type=float, help="seconds between observations (default 2)")
    start.add_argument("--period", type=float, help="re-plan at least this often, seconds (default 30)")
    start.add_argument("--window", type=float, help="seconds of arrivals the rate is measured over (default 30)")
    start.add_argument("--min-interval", type=float, help="seconds between reconfigurations (default 60)")
    start.add_argument("--min-replicas", type=int, help="warm replicas kept without traffic (default 1)")
    start.add_argument("--deploy", action="store_true", help="deploy the serving config first")
    start.add_argument("--ray-address", default="auto", help="Ray cluster (default: the running one)")
    start.set_defaults(run=run_start)
    status = actions.add_parser("status", help="the controller's recent decisions")
    status.add_argument("--json", action="store_true")
    status.add_argument("--ray-address", default="auto")
    status.set_defaults(run=run_status)
    stop = actions.add_parser("stop", help="stop the controller (serving goes on as it is)")
    stop.add_argument("--ray-address", default="auto")
    stop.set_defaults(run=run_stop)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from dilaserve.controller.config import ControllerConfigError

    data: dict[str, Any] = {}
    if args.settings:
        try:
            with open(args.settings) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ControllerConfigError(f"{args.settings}: cannot read the controller settings: {exc}") from None
        if not isinstance(data, dict):
            raise ControllerConfigError(f"{args.settings}: the controller settings must be a YAML mapping")
    for flag, name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[name] = value
    return data


def _connect(address: str) -> None:
    import logging

    import ray

    ray.init(address=address, namespace="dilaserve", logging_level=logging.WARNING)


def run_start(args: argparse.Namespace) -> int:
    from dilaserve.controller.config import parse_controller_config
    from dilaserve.serving.config import load_config

    serve_config = load_config(args.config)
    config = parse_controller_config(_settings(args), args.settings or "controller settings")
    _connect(args.ray_address)
    from dilaserve.controller.actor import start_controller

    if args.deploy:
        from ray import serve

        from dilaserve.controller.deploy import deploy_controlled

        serve.start(http_options={"host": serve_config.http.host, "port": serve_config.http.port})
        deploy_controlled(serve_config)
        print(f"deployed {serve_config.app_name} at http://{serve_config.http.host}:{serve_config.http.port}/v1")
    start_controller(serve_config, config)
    print(f"controller started for {serve_config.app_name} on {config.gpus} GPUs "
          f"(re-plans every {config.period_s:g} s or on load changes); `dilaserve control status` to follow it")
    return 0


def run_status(args: argparse.Namespace) -> int:
    import ray

    _connect(args.ray_address)
    from dilaserve.controller.actor import get_controller

    handle = get_controller()
    if handle is None:
        print("no controller is running", file=sys.stderr)
        return 1
    status = ray.get(handle.status.remote(), timeout=60)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"running: {status['is_running']}; reconfigurations: {status['num_reconfigurations']}; "
          f"last planned rate: {status['planned_rate_rps']}")
    for h in status["history"][-20:]:
        rate = "-" if h["rate_rps"] is None else f"{h['rate_rps']:.2f}"
        print(f"{h['time_s']:12.1f}  {h['kind']:11}  rate {rate:>6} req/s  {h['reason']}")
        for action in h["actions"]:
            print(f"{'':16}{action}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    _connect(args.ray_address)
    from dilaserve.controller.actor import stop_controller

    if not stop_controller():
        print("no controller is running", file=sys.stderr)
        return 1
    print("controller stopped; serving goes on with the replicas it left")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dilaserve.errors import DiLaServeError

    parser = argparse.ArgumentParser(prog="dilaserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["control", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.run(args) or 0)
    except DiLaServeError as exc:
        print(f"dilaserve control: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
