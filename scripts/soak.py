#!/usr/bin/env python
"""Soak (and overload) run: a local Ray cluster serving a random LLaDA model, replayed at a
fraction of its measured capacity for N minutes, reporting over time the replicas' RSS, the
KV pages free, queue lengths, SLO attainment and latency (a table, JSON, and a PNG if asked).

    .venv/bin/python scripts/soak.py                           # 70% of capacity for 30 minutes
    .venv/bin/python scripts/soak.py --minutes 5 --png runs/soak.png --json runs/soak.json
    .venv/bin/python scripts/soak.py --rate-factor 3 --minutes 1   # overload: 3x capacity

Capacity is measured first: ``--concurrency`` clients sending back to back (best effort).
The model has hidden size 256 and 4 layers so that the replica, not the HTTP front end,
saturates on a small CPU machine. The load generator is the reliability tests' one
(tests/reliability/reliability_helpers.py). Exit status 1 if any request went unanswered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(ROOT))

import reliability_helpers as rh  # noqa: E402

APP = "soak"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(model_dir: str, port: int, num_replicas: int):
    from ray import serve

    from dilaserve.serving.app import build_app
    from dilaserve.serving.config import parse_config

    config = parse_config({
        "app_name": APP,
        "models": [{"name": rh.MODEL, "path": model_dir}],
        "variants": [{"name": "cpu", "model": rh.MODEL, "num_replicas": num_replicas, "num_cpus_per_replica": 0.25,
                      "threshold": 0.9, "engine": {"kv_memory_gib": 0.05}}],
        "http": {"host": "127.0.0.1", "port": port, "api_key": rh.API_KEY, "ingress_num_cpus": 0.1},
        "defaults": {"max_tokens": 64, "block_length": 32},
    }, "soak config")
    serve.run(build_app(config), name=APP, route_prefix="/")
    return config


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(t, [r["rss_mib"] for r in rows]); axes[0].set_ylabel("replica RSS (MiB)")
    axes[1].plot(t, [r["pages_free"] for r in rows]); axes[1].set_ylabel("KV pages free")
    axes[2].plot(t, [r["p50_ms"] for r in rows], label="p50"); axes[2].plot(t, [r["p99_ms"] for r in rows], label="p99")
    axes[2].set_ylabel("latency (ms)"); axes[2].legend()
    axes[3].plot(t, [r["attainment"] for r in rows]); axes[3].set_ylabel("SLO attainment"); axes[3].set_xlabel("minutes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate-factor", type=float, default=0.7, help="offered load as a multiple of the capacity")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=4, help="clients of the capacity measurement")
    p.add_argument("--window-s", type=float, default=60.0, help="rows of the table")
    p.add_argument("--json", help="write the rows and the summary here")
    p.add_argument("--png", help="plot RSS, pages free, latency and attainment over time here")
    args = p.parse_args(argv)

    import ray
    import torch
    from ray import serve

    from dilaserve.models.checkpoint import make_random_checkpoint

    torch.set_num_threads(1)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(make_random_checkpoint(tmp, "llada", seed=1, hidden_size=256, num_layers=4, num_heads=4,
                                                   intermediate_size=1024, max_positions=256))
            deploy(model_dir, port, args.replicas)
            url = f"http://127.0.0.1:{port}"
            body = lambda i: rh.completion_body(i, max_tokens=64, block_length=32)  # noqa: E731
            capacity = rh.closed_loop_rps(url, args.concurrency, 15.0, body)
            rate = args.rate_factor * capacity
            print(f"capacity {capacity:.2f} req/s; offering {rate:.2f} req/s ({args.rate_factor}x) for "
                  f"{args.minutes} min", flush=True)
            samples: list = []
            started = time.monotonic()
            outcomes = rh.run_open_loop(url, rate, args.minutes * 60, body,
                                        on_tick=rh.sampler(url, APP, samples, 10.0))
            wall = time.monotonic() - started
            rows = rh.window_rows(outcomes, samples, args.window_s)
            t = rh.tally(outcomes)
            refusals = rh.latency_summary_ms([o.latency_s for o in outcomes if o.kind == "refused"])
            admitted = rh.latency_summary_ms([o.latency_s for o in outcomes if o.kind == "ok"])
            rss = [sum(v for v in s.rss_mib.values() if v) for s in samples if s.rss_mib]
            summary = {
                "capacity_rps": capacity, "offered_rps": rate, "minutes": args.minutes, "wall_s": wall,
                "sent": t.sent, "answered": t.answered, "ok": t.ok, "refused": t.refused, "errors": t.errors,
                "lost": t.lost, "admitted_attainment": t.attainment, "by_status": t.by_status,
                "admitted_latency_ms": admitted, "refusal_latency_ms": refusals,
                "rss_mib_first": rss[0] if rss else None, "rss_mib_last": rss[-1] if rss else None,
                "rss_mib_max": max(rss) if rss else None,
                "pages_free_min": min((sum(v for v in s.pages_free.values() if v is not None) for s in samples),
                                      default=None),
            }
            print(rh.format_table(rows))
            print(json.dumps(summary, indent=1, default=float))
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=float))
            if args.png:
                plot(rows, args.png)
            return 0 if t.sent == t.answered and t.lost == 0 else 1
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
