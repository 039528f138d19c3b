"""Planner benchmark: ILP solve time for clusters of 8 to 256 GPUs, 4 degrees x 8 thresholds.

Profiles: the shipped illustrative defaults (LLaDA-8B shape on H200, degrees 1/2/4/8, eight
thresholds 0.4-0.95); requests of 256 + 256 tokens; quality budget 1 point. Three loads per
cluster size: light (1.5 req/s per GPU, fits), heavy (5 req/s per GPU, overloaded: the
answer also reports the GPUs that would serve everything, one more solve not timed here), and
a tight SLO (scale 0.8, 0.5 req/s per GPU: only multi-GPU instances meet it). Solve time is
the three lexicographic solver calls of one ``plan``; median and max of ``--repeats``.
Prints a markdown table and writes JSON + markdown under docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

from dilaserve.planner import PlannerOptions, Workload, load_profile_set, plan

LOADS = (("light", 1.5, 3.0), ("heavy", 5.0, 3.0), ("tight SLO", 0.5, 0.8))  # name, req/s per GPU, slo scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    solvers = ["cbc"] + (["highs"] if importlib.util.find_spec("highspy") else [])
    profiles = load_profile_set()
    rows = []
    for solver in solvers:
        for gpus in args.gpus:
            for name, per_gpu, slo_scale in LOADS:
                workload = Workload(per_gpu * gpus, 256, 256)
                solve_times, wall_times = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = plan(profiles, workload, gpus, slo_scale, 1.0, PlannerOptions(solver=solver))
                    wall_times.append(time.perf_counter() - start)
                    solve_times.append(result.plan.solve_time_s)
                p = result.plan
                rows.append({"solver": solver, "gpus": gpus, "load": name, "rate_rps": workload.rate_rps,
                             "slo_scale": slo_scale, "status": result.status.value, "served_share": p.served_share,
                             "gpus_used": p.gpus_used, "accuracy": p.accuracy,
                             "instances": [list(i) for i in p.instances],
                             "solve_s_median": statistics.median(solve_times), "solve_s_max": max(solve_times),
                             "plan_call_s_median": statistics.median(wall_times)})
    header = "| solver | GPUs | load | req/s | status | served | GPUs used | accuracy | solve median (ms) | solve max (ms) | plan() median (ms) |"
    lines = [header, "|" + "---|" * 4 + "---|" + "---:|" * 6]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['gpus']} | {r['load']} | {r['rate_rps']:g} | {r['status']} | "
                     f"{100 * r['served_share']:.1f}% | {r['gpus_used']} | {100 * r['accuracy']:.1f}% | "
                     f"{1000 * r['solve_s_median']:.0f} | {1000 * r['solve_s_max']:.0f} | {1000 * r['plan_call_s_median']:.0f} |")
    table = "\n".join(lines)
    print(table)
    today = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    versions = {"pulp": version("pulp"), "highspy": version("highspy") if "highs" in solvers else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"planner_{today}.json").write_text(json.dumps(
        {"benchmark": "bench_planner", "date": today, "machine": machine, "profiles": "shipped illustrative defaults",
         "degrees": [d.degree for d in profiles.latency.degrees],
         "thresholds": [e.threshold for e in profiles.quality.settings()], "request_tokens": [256, 256],
         "quality_budget_points": 1.0, "repeats": args.repeats, "versions": versions, "rows": rows}, indent=2))
    (out / f"planner_{today}.md").write_text(
        f"# Planner ILP solve time ({today}, {machine})\n\n"
        f"Shipped illustrative profiles: degrees 1/2/4/8 x 8 thresholds (32 integer instance counts + 32 traffic shares "
        f"before bounds), requests of 256 + 256 tokens, quality budget 1 point. Solve = the three lexicographic "
        f"solver calls of one `plan` (median / max of {args.repeats}); `plan()` adds capacities and, when "
        f"overloaded, the solve for the GPUs that would serve everything. Versions: "
        f"{', '.join(f'{k} {v}' for k, v in versions.items() if v)}. Made by `scripts/bench_planner.py`.\n\n"
        f"{table}\n")


if __name__ == "__main__":
    main()
