"""Benchmark: the simulator replays a 1,000,000-request trace on 256 replicas (target: < 2 min
on one CPU core).

    .venv/bin/python scripts/bench_simulator.py [--requests 1000000] [--replicas 256] [--rate 6500]

The simulation runs in this one process (single-threaded: numpy's small-array operations do
not spawn threads). It times the stages separately, with wall and process CPU time, and writes
``docs/benchmarks/simulator_<date>.{json,md}``. The default rate puts the cluster near its
capacity (~85% with the default step cost), where batches are large and queues form.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dilaserve.replay.metrics import compute_metrics  # noqa: E402
from dilaserve.replay.report import metrics_table  # noqa: E402
from dilaserve.replay.synthetic import IndependentLengths, LogNormalLength, PoissonArrivals, synthesize  # noqa: E402
from dilaserve.serving.config import RoutingConfig  # noqa: E402
from dilaserve.sim import ClusterConfig, SimPolicies, simulate  # noqa: E402


class Stopwatch:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def time(self, name: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        stage = self.stages[name] = {"wall_s": round(time.perf_counter() - wall, 2),
                                     "cpu_s": round(time.process_time() - cpu, 2)}
        print(f"{name:>10}: {stage['wall_s']:7.2f} s wall, {stage['cpu_s']:7.2f} s CPU", flush=True)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=256)
    parser.add_argument("--rate", type=float, default=6500.0, help="arrivals per second (Poisson)")
    parser.add_argument("--policy", default="slack", choices=["slack", "round_robin", "power_of_two"])
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    watch = Stopwatch()
    lengths = IndependentLengths(LogNormalLength(256, 0.5), LogNormalLength(64, 0.5))
    trace = watch.time("trace", synthesize, PoissonArrivals(args.rate), lengths, num_requests=args.requests, seed=0)
    cluster = ClusterConfig.homogeneous(args.replicas)
    policies = SimPolicies(routing=RoutingConfig(policy=args.policy), fidelity="fast", system=f"sim-{args.policy}")
    records = watch.time("simulate", simulate, trace, cluster, policies)
    metrics = watch.time("metrics", compute_metrics, records)
    table = metrics_table([metrics])
    print(table)
    sim = watch.stages["simulate"]
    verdict = "PASS" if sim["wall_s"] < 120 else "FAIL"
    print(f"simulate: {sim['wall_s']:.1f} s wall, {sim['cpu_s']:.1f} s CPU for {len(trace)} requests on "
          f"{args.replicas} replicas ({1e6 * sim['cpu_s'] / len(trace):.0f} us CPU per request): {verdict} (< 120 s)")

    if args.no_write:
        return 0
    today = datetime.date.today().isoformat()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "load_average_1m": round(os.getloadavg()[0], 2), "processor": _cpu_model()}
    result = {
        "date": today, "benchmark": "simulator", "fidelity": "fast", "requests": len(trace), "replicas": args.replicas,
        "rate_rps": args.rate, "policy": args.policy, "lengths": "log-normal prompt 256 / output 64 tokens, CV 0.5",
        "step_cost": "StepCost() defaults (2 ms + 20 us/token + 0.1 us/key)", "stages": watch.stages,
        "target_s": 120, "verdict": verdict, "machine": machine,
        "metrics": {"slo_attainment": metrics.slo_attainment, "refused_share": metrics.refused_share,
                    "e2e_p50_s": metrics.e2e_s.p50, "e2e_p99_s": metrics.e2e_s.p99,
                    "simulated_span_s": metrics.duration_s},
    }
    (out / f"simulator_{today}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"simulator_{today}.md").write_text(
        f"# Simulator benchmark, {today}\n\n"
        f"`python scripts/bench_simulator.py` — {len(trace):,} Poisson arrivals at {args.rate:g} req/s "
        f"({metrics.duration_s:.0f} s simulated) on {args.replicas} replicas, fast fidelity, {args.policy} routing, "
        f"admission on; {result['lengths']}; {result['step_cost']}.\n\n"
        "| stage | wall (s) | CPU (s) |\n|---|---:|---:|\n"
        + "".join(f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |\n" for k, v in watch.stages.items())
        + f"\nTarget: simulate < 120 s on one core: **{verdict}** "
        f"({1e6 * sim['cpu_s'] / len(trace):.0f} us CPU per request). One process, single-threaded; machine: "
        f"{machine['processor']}, {machine['cpu_count']} cores shared with other jobs "
        f"(1-minute load average {machine['load_average_1m']} at the end), Python {machine['python']}.\n\n"
        f"## Simulated outcome\n\n{table}"
    )
    print(f"wrote {out / f'simulator_{today}.json'} and .md")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
