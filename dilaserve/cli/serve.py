"""``dilaserve serve``: the OpenAI-compatible HTTP server on Ray Serve, until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


API_KEY_ENV = "DILASERVE_API_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve models over OpenAI-compatible HTTP on Ray Serve (until Ctrl-C)")
    p.add_argument("--config", help="serving config YAML (default: the embedded default model on one CPU replica)")
    p.add_argument("--model", help="model directory to serve on one CPU replica, under the directory's name "
                   "(ignored with --config)")
    p.add_argument("--host", help="HTTP host (overrides the config; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (overrides the config; default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer <key>' on /v1/* (default: ${API_KEY_ENV}, else the "
                        "config's http.api_key, else no authentication)")
    p.add_argument("--ray-address", help="Ray cluster to deploy on (default: a running local one, else start one)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dilaserve.serving.config import default_config, load_config, with_http

    if args.port is not None and not 1 <= args.port <= 65535:
        from dilaserve.errors import InvalidRequestError

        raise InvalidRequestError(f"--port must be in 1..65535, got {args.port}")
    if args.config:
        config = with_http(load_config(args.config), args.host, args.port, args.api_key)
    else:
        config = with_http(default_config(args.model, args.host, args.port), api_key=args.api_key)

    import ray
    from ray import serve

    from dilaserve.serving.app import run_local
    from dilaserve.serving.model_store import resolve_model_dir

    if args.ray_address is None:
        for model in config.models:  # locally, build a missing default model once, here, not in every worker
            resolve_model_dir(model)
    stop = threading.Event()

    def stop_on_signals() -> None:  # also when started in the background (SIGINT ignored there)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    stop_on_signals()
    url, started_ray = run_local(config, args.ray_address)
    # ray.init replaces the SIGTERM handler (the process then died at once, leaving the local Ray
    # instance and Serve running): ours again, so a stop (systemd, docker, kill) shuts down.
    stop_on_signals()
    models = ", ".join(m.name for m in config.models)
    auth = "API key required" if config.http.api_key else "no API key required"
    print(f"DiLaServe is serving {models} at {url}/v1 (OpenAI-compatible; {auth}; metrics at {url}/metrics). "
          "Ctrl-C to stop.", flush=True)
    try:
        stop.wait()
        print("stopping", file=sys.stderr, flush=True)
    finally:
        serve.delete(config.app_name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
