"""#13 in the simulator: the Azure conversation trace on 4 and 8 simulated H200s, a static layout
against DiLaServe, at several rate scales with a load step mid-trace.

    .venv/bin/python scripts/bench_sim_cluster.py [--gpus 4,8] [--rate-scales 2,4,6] [--trace PATH]

The prediction the real multi-GPU run (issue 13) is to be compared with; it is not that run.
What is real: the engine's scheduling policies, the serving layer's admission and routing, the
controller and planner (``dilaserve.controller.Controller`` ticking on the simulated clock), the
trace (``AzureLLMInferenceTrace_conv.csv``, read from ``../shared/traces``), step costs measured on
an H200 for tensor-parallel degrees 1 and 2 (``docs/benchmarks/tensor_parallel_h200x2_2026-11-22``,
LLaDA-8B shape, random bf16 weights; degrees 4 and 8 were never measured, so the planner is not
offered them), and tokens decided per step and accuracy per threshold measured on the embedded
model (its quality profile, 200 arithmetic problems). Accuracy here is that profile's accuracy
at the threshold each request ran at: a proxy, not a measurement on the trace's requests.

Each point: the trace's first ``--phase-s`` seconds at ``rate scale x`` its own rate, then the
next stretch at twice that (the load step), lengths from the trace (clipped to the model's 4096
positions), ``N`` degree-1 replicas at threshold 0.9 at the start. Systems (``bench_sim_controller``):
- static: N replicas at 0.9 throughout, round-robin routing, no admission (issue 13's baseline);
- policies: the same replicas, DiLaServe's slack-aware routing and deadline-aware admission,
  no controller (what the per-request policies alone give);
- dilaserve: the controller re-planning degrees and thresholds within N GPUs and a 2-point quality
  budget, slack-aware routing, deadline-aware admission (refusals count as misses). The
  cluster is dedicated (``keep_gpus``: spare GPUs run more replicas of the plan's most accurate
  setting) and plans for p90 lengths (``--length-statistic``), unless ``--elastic`` / another
  statistic is given.
Deadlines: ``--slo-scale`` x the request's latency alone on an idle degree-1 replica at 0.9.
Writes docs/benchmarks/sim_cluster_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_sim_controller as bsc  # noqa: E402
from dilaserve.planner import load_profile_set  # noqa: E402
from dilaserve.replay.loaders import load_trace  # noqa: E402
from dilaserve.replay.trace import Trace, TraceRequest  # noqa: E402

LATENCY = ROOT / "docs/benchmarks/tensor_parallel_h200x2_2026-11-22/latency_llada-8b-random_nvidia_h200.json"
QUALITY = ROOT / "docs/benchmarks/quality_dilaserve-tiny-arith_cpu_2026-11-22/quality_dilaserve-tiny-arith_arith.json"
TRACE = ROOT.parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"
MAX_POSITIONS = 4096  # LLaDA-8B
bsc.SYSTEMS.setdefault("static-rr", ("round_robin", False, False, "initial"))


def step_trace(trace: Trace, scale: float, phase_s: float) -> Trace:
    """The trace at ``scale`` x its rate for ``phase_s`` seconds, then at twice that for as long."""
    fast = trace.rebase().scale_rate(scale)
    out = []
    for r in fast:
        t = r.arrival_s if r.arrival_s < phase_s else phase_s + (r.arrival_s - phase_s) / 2
        if t >= 2 * phase_s:
            break
        out.append(TraceRequest(t, r.prompt_tokens, r.output_tokens))
    return Trace(tuple(out), f"{trace.name} x{scale:g}, x{2 * scale:g} from {phase_s:g} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="4,8")
    p.add_argument("--rate-scales", default="1,1.5,2", help="x the trace's own rate (before the step)")
    p.add_argument("--phase-s", type=float, default=120.0)
    p.add_argument("--slo-scale", type=float, default=4.0)
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--length-statistic", default="p90", help="the controller's (planner/workload.py)")
    p.add_argument("--elastic", action="store_true",
                   help="let the controller give GPUs back (default: keep_gpus, the cluster is dedicated)")
    p.add_argument("--fidelity", default="step", choices=["fast", "step"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks"))
    p.add_argument("--tag", default="", help="appended to the output files' names")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    trace, _ = load_trace(args.trace)
    trace = trace.cap_lengths(max_total_tokens=MAX_POSITIONS)
    profiles = load_profile_set(latency=LATENCY, quality=QUALITY).without_sparse()
    controller = dict(tick_s=2.0, window_s=20.0, period_s=20.0, min_interval_s=60.0, headroom=0.2,
                      length_statistic=args.length_statistic, keep_gpus=not args.elastic)
    points = []
    date = datetime.date.today().isoformat()
    runs = [(g, s) for g in (int(x) for x in args.gpus.split(",")) for s in (float(x) for x in args.rate_scales.split(","))]
    for gpus, scale in tqdm(runs, desc="points", unit="point"):
        trace_here = step_trace(trace, scale, args.phase_s)
        prompt = int(sum(r.prompt_tokens for r in trace_here) / len(trace_here))
        output = int(sum(r.output_tokens for r in trace_here) / len(trace_here))
        sc = bsc.Scenario(f"h200x{gpus}", profiles, gpus, gpus, len(trace_here) / (1.5 * 2 * args.phase_s),
                          (args.phase_s, args.phase_s), prompt, output, 32, args.slo_scale, 2.0, 30.0, controller,
                          30.0, f"{gpus} simulated H200s, Azure conversation trace x{scale:g}")
        point = {"gpus": gpus, "rate_scale": scale, "requests": len(trace_here),
                 "offered_rps": [sum(r.arrival_s < args.phase_s for r in trace_here) / args.phase_s,
                                 sum(r.arrival_s >= args.phase_s for r in trace_here) / args.phase_s],
                 "systems": {}}
        for system in ("static-rr", "policies", "dilaserve"):
            run = bsc.run_system(system, sc, trace_here, args.fidelity, args.seed)
            summary = bsc.summarize(run["records"], sc, run["membership"], gpus)["phases"]
            phases = {"before": summary["before the step"], "after": summary["after the step"]}
            plans = [f"t={h['time_s']:.0f}s {h['kind']}: " + "; ".join(str(a) for a in h["actions"][:4])
                     for h in run["ticks"]]
            point["systems"][system] = {"phases": phases, "reconfigurations": run["num_reconfigurations"],
                                        "plans": plans, "sim_wall_s": run["wall_s"]}
        points.append(point)
        s, d = (point["systems"][k]["phases"]["after"] for k in ("static-rr", "dilaserve"))
        tqdm.write(f"{gpus} GPUs x{scale:g}: attainment after the step static {bsc._pct(s['attainment'])}, "
                   f"dilaserve {bsc._pct(d['attainment'])}")
    lines = [f"# #13 in the simulator: Azure conversation trace on simulated H200s ({date})", "",
             (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             f"Command: `.venv/bin/python scripts/bench_sim_cluster.py --gpus {args.gpus} --rate-scales "
             f"{args.rate_scales} --phase-s {args.phase_s:g} --slo-scale {args.slo_scale:g} --length-statistic "
             f"{args.length_statistic}{' --elastic' if args.elastic else ''} --fidelity {args.fidelity}`",
             "", "| GPUs | rate scale | offered req/s (before / after the step) | phase | system | SLO attainment | "
             "goodput req/s | refused | p99 e2e s | accuracy (profile) |", "|---:|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for pt in points:
        for phase in ("before", "after"):
            for system, r in pt["systems"].items():
                ph = r["phases"][phase]
                p99 = "-" if ph["p99_e2e_s"] is None else f"{ph['p99_e2e_s']:.1f}"
                lines.append(f"| {pt['gpus']} | {pt['rate_scale']:g} | {pt['offered_rps'][0]:.1f} / "
                             f"{pt['offered_rps'][1]:.1f} | {phase} | {system} | {bsc._pct(ph['attainment'])} | "
                             f"{ph['goodput_rps']:.2f} | {bsc._pct(ph['refused'])} | {p99} | {bsc._pct(ph['accuracy'])} |")
    lines += ["", "## What DiLaServe's controller did", ""]
    for pt in points:
        r = pt["systems"]["dilaserve"]
        lines.append(f"- {pt['gpus']} GPUs, x{pt['rate_scale']:g}: {r['reconfigurations']} reconfigurations")
        lines += [f"  - {plan}" for plan in r["plans"][:8]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sim_cluster_{date}{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"sim_cluster_{date}{args.tag}.json").write_text(json.dumps({"settings": vars(args), "points": points}, indent=1,
                                                             default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
