"""``dilaserve demo``: the static baseline and DiLaServe on one machine, side by side."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from dilaserve.demo import DemoSettings

    d = DemoSettings()
    p = sub.add_parser("demo", help="replay a bursty trace against a static baseline and DiLaServe (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="directory for records, report.md and plots")
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--duration", type=float, default=d.duration_s, help="trace seconds")
    p.add_argument("--burst-rate", type=float, default=d.on_rate_rps, help="arrivals per second in bursts")
    p.add_argument("--quiet-rate", type=float, default=d.off_rate_rps, help="arrivals per second between bursts")
    p.add_argument("--replicas", type=int, default=d.num_replicas)
    p.add_argument("--slo-scale", type=float, default=d.slo_scale)
    p.add_argument("--quality-floor", type=float, default=d.quality_floor)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dilaserve.demo import DemoSettings, run_demo

    settings = DemoSettings(
        duration_s=args.duration, on_rate_rps=args.burst_rate, off_rate_rps=args.quiet_rate,
        num_replicas=args.replicas, slo_scale=args.slo_scale, quality_floor=args.quality_floor,
        port=args.port, seed=args.seed,
    )
    run_demo(args.out, settings, args.model)
    return 0
