"""The controller in the simulator: a load step (the rate doubles mid-trace), static against DiLaServe.

    .venv/bin/python scripts/bench_sim_controller.py [--scenarios cpu-small,gpu-32] [--fidelity fast]

Every system replays the same load-step trace on the simulated cluster (``dilaserve.sim``) and
starts from the same replicas at threshold 0.9:

- static: those replicas throughout, power-of-two routing, no admission (the baseline);
- static-max: as many degree-1 replicas as the controller's GPU budget, throughout (a bound);
- policies: DiLaServe's per-request policies without the controller (slack routing, admission);
- controller: the controller with the baseline's routing (power-of-two, no admission);
- dilaserve: the controller with slack routing and admission (refusals count as misses).

The controller is ``dilaserve.controller.Controller`` itself, ticking on the simulated clock
over ``dilaserve.sim.controlled.SimulatedCluster`` (new replicas ready ``startup_s`` after they
are started; drained before they stop). Deadlines: ``slo_scale`` x the cost model's latency of
the request alone on an idle degree-1 replica at threshold 0.9 (as ``dilaserve replay`` sends
them). Accuracy is not measured here: it is the quality profile's accuracy at the threshold
each request ran at (interpolated), averaged over answered requests. Every request in the
trace has exactly one record, and no admitted one is left unfinished (asserted).

Scenarios: ``cpu-small`` mirrors ``scripts/bench_controller_cpu.py`` (the embedded model on
one CPU thread: its fitted step cost from docs/benchmarks/controller_cpu_2026-11-22.json and
its measured quality profile; 1 replica, the controller may run 2; 3 then 6 req/s, prompts of
400 tokens, 32 generated, block 32). ``gpu-32`` / ``gpu-64``: the planner's illustrative
LLaDA-8B / H200 profiles (degrees 1, 2, 4, 8), 16 degree-1 replicas at the start and a budget
of 32 / 64 GPUs. Writes docs/benchmarks/sim_controller_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dilaserve.controller.config import ControllerConfig  # noqa: E402
from dilaserve.controller.decision import Planning  # noqa: E402
from dilaserve.engine.config import EngineConfig  # noqa: E402
from dilaserve.engine.cost_model import StepCost, request_work, work_s  # noqa: E402
from dilaserve.planner import PlannerOptions, ProfileSet, load_profile_set  # noqa: E402
from dilaserve.planner.profiles import latency_profile_from_dict, quality_profile_from_dict  # noqa: E402
from dilaserve.replay.metrics import compute_metrics  # noqa: E402
from dilaserve.serving.config import AdmissionConfig, RequestDefaults, RoutingConfig, SLOConfig  # noqa: E402
from dilaserve.sim import AcceptanceModel, ClusterConfig, ReplicaGroup, SimPolicies, simulate  # noqa: E402
from dilaserve.sim.controlled import ControlSetup, simulate_controlled  # noqa: E402
from dilaserve.sim.load_step import load_step_trace  # noqa: E402

CPU_RUN = ROOT / "docs/benchmarks/controller_cpu_2026-11-22.json"
TINY_QUALITY = ROOT / "dilaserve/assets/models/dilaserve-tiny-arith/quality_profile.json"
BASE_THRESHOLD = 0.9
# name: (routing, admission, controller, replicas at the start: "initial" or "max")
SYSTEMS = {
    "static": ("power_of_two", False, False, "initial"),
    "static-max": ("power_of_two", False, False, "max"),
    "policies": ("slack", True, False, "initial"),
    "controller": ("power_of_two", False, True, "initial"),
    "dilaserve": ("slack", True, True, "initial"),
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    profiles: ProfileSet
    initial_replicas: int  # degree-1 replicas at the start
    gpus: int  # the controller's budget
    rate_rps: float  # before the step; twice that after it
    phases_s: tuple[float, float]
    prompt_tokens: int
    output_tokens: int
    block_size: int
    slo_scale: float
    quality_budget: float  # accuracy points
    startup_s: float
    controller: dict  # ControllerConfig fields besides gpus / slo_scale / quality_budget
    bin_s: float
    note: str
    cost_scale: float = 1.0  # the simulated replicas' true step time / the latency profile's


def cpu_profiles() -> tuple[ProfileSet, str]:
    """The embedded model's fitted CPU step cost (from the real run's report) and its quality profile."""
    degree = json.loads(CPU_RUN.read_text())["meta"]["fitted step cost"]
    if isinstance(degree, str):  # the report writes it with str(): a Python dict literal
        import ast
        degree = ast.literal_eval(degree)
    latency = latency_profile_from_dict({"model": "dilaserve-tiny-arith", "device": "cpu (1 thread)", "cache": "dual",
                                         "degrees": [degree]}, str(CPU_RUN))
    quality = quality_profile_from_dict(json.loads(TINY_QUALITY.read_text()), str(TINY_QUALITY))
    return ProfileSet(latency, quality, f"{CPU_RUN.name} + {TINY_QUALITY.name}"), str(degree)


def scenarios() -> dict[str, Scenario]:
    cpu, _ = cpu_profiles()
    gpu = load_profile_set(None).without_sparse()  # the simulated replicas do not model sparse KV
    cpu_controller = dict(tick_s=1.0, window_s=10.0, period_s=5.0, min_interval_s=30.0, headroom=0.2)
    gpu_controller = dict(tick_s=2.0, window_s=20.0, period_s=20.0, min_interval_s=60.0, headroom=0.2)
    return {
        "cpu-small": Scenario("cpu-small", cpu, 1, 2, 3.0, (45.0, 75.0), 400, 32, 32, 4.0, 2.0, 10.0, cpu_controller,
                              10.0, "the embedded model on one CPU thread, as the real CPU run"),
        "cpu-slow": Scenario("cpu-slow", cpu, 1, 2, 3.0, (45.0, 75.0), 400, 32, 32, 4.0, 2.0, 10.0, cpu_controller,
                             10.0, "as cpu-small, but the replicas run 1.25x slower than the profile says (as the "
                             "real run did: HTTP, tokenization, a shared host)", cost_scale=1.25),
        "gpu-32": Scenario("gpu-32", gpu, 16, 32, 36.0, (120.0, 240.0), 512, 256, 32, 3.0, 1.0, 30.0, gpu_controller,
                           30.0, "illustrative LLaDA-8B / H200 profiles, 16 -> up to 32 GPUs"),
        "gpu-64": Scenario("gpu-64", gpu, 32, 64, 72.0, (120.0, 240.0), 512, 256, 32, 3.0, 1.0, 30.0, gpu_controller,
                           30.0, "illustrative LLaDA-8B / H200 profiles, 32 -> up to 64 GPUs"),
    }


def accuracy_at(profiles: ProfileSet, threshold: float) -> float:
    """The quality profile's accuracy at ``threshold`` (linear between its thresholds, clamped)."""
    settings = sorted(profiles.quality.settings(), key=lambda e: e.threshold)
    return float(np.interp(threshold, [e.threshold for e in settings], [e.accuracy for e in settings]))


def build(sc: Scenario, fidelity: str, seed: int):
    degrees = {d.degree: d for d in sc.profiles.latency.degrees}
    variants = {d: f"tp{d}" for d in degrees}
    page_size = EngineConfig().page_size
    true_cost = {d: dataclasses.replace(p.cost, fixed_s=p.cost.fixed_s * sc.cost_scale,
                                        per_token_s=p.cost.per_token_s * sc.cost_scale,
                                        per_context_s=p.cost.per_context_s * sc.cost_scale)
                 for d, p in degrees.items()}
    groups = tuple(ReplicaGroup(variants[d], sc.initial_replicas if d == 1 else 0, true_cost[d],
                                EngineConfig(max_running=p.max_running, num_pages=p.kv_capacity_tokens // page_size),
                                BASE_THRESHOLD) for d, p in degrees.items())
    defaults = RequestDefaults(block_length=sc.block_size, cache=sc.profiles.latency.cache)
    cluster = ClusterConfig(groups, defaults)
    acceptance = AcceptanceModel(tuple((e.threshold, e.tokens_per_step) for e in sc.profiles.quality.settings()))
    cost: StepCost = true_cost[1]
    tokens_per_step = acceptance.mean(BASE_THRESHOLD, sc.block_size)

    def idle_latency_s(prompt: int, output: int) -> float:
        return work_s(cost, request_work(prompt + output, output, sc.block_size, tokens_per_step, defaults.cache))

    policies = SimPolicies(slo=SLOConfig(slo_scale=sc.slo_scale, overhead_ms=0.0), fidelity=fidelity,
                           acceptance=acceptance, baseline=idle_latency_s, seed=seed)
    config = ControllerConfig(gpus=sc.gpus, slo_scale=sc.slo_scale, quality_budget=sc.quality_budget,
                              start_timeout_s=600.0, drain_timeout_s=120.0, **sc.controller)
    planning = Planning.for_degrees(sc.profiles, list(degrees), gpus=sc.gpus, slo_scale=sc.slo_scale,
                                    quality_budget=sc.quality_budget, options=PlannerOptions())
    control = ControlSetup(config, planning, variants, startup_s=sc.startup_s)
    return cluster, policies, control, idle_latency_s


def run_system(system: str, sc: Scenario, trace, fidelity: str, seed: int) -> dict:
    routing, admission, use_controller, replicas = SYSTEMS[system]
    cluster, policies, control, _ = build(sc, fidelity, seed)
    if replicas == "max":
        cluster = dataclasses.replace(cluster, groups=tuple(
            dataclasses.replace(g, count=sc.gpus if g.name == "tp1" else 0) for g in cluster.groups))
    policies = dataclasses.replace(policies, routing=RoutingConfig(policy=routing, seed=seed),
                                   admission=AdmissionConfig(enabled=admission), system=system)
    start = time.perf_counter()
    ticks, membership, violations, reconfigurations = [], [], [], 0
    if use_controller:
        run = simulate_controlled(trace, cluster, policies, control)
        records, violations, reconfigurations = run.records, run.violations, run.num_reconfigurations
        ticks = [t.to_dict() for t in run.ticks if t.actions]
        membership = [dataclasses.asdict(m) for m in run.membership]
    else:
        records = simulate(trace, cluster, policies)
    wall_s = time.perf_counter() - start
    # No request lost: one record per arrival, every admitted one answered.
    assert len(records) == len(trace), (system, len(records), len(trace))
    assert sorted(r.request_id for r in records) == list(range(len(trace)))
    assert all(r.finish_s is not None and r.finish_s >= r.arrival_s for r in records)
    assert not violations, violations
    return {"records": records, "ticks": ticks, "membership": membership, "violations": violations,
            "num_reconfigurations": reconfigurations, "wall_s": wall_s,
            "num_ok": sum(r.status.value == "ok" for r in records)}


def summarize(records, sc: Scenario, membership: list[dict], initial_gpus: int) -> dict:
    step, end = sc.phases_s[0], sc.phases_s[0] + sc.phases_s[1]
    out = {"phases": {}, "bins": []}
    for label, lo, hi in (("before the step", 0.0, step), ("after the step", step, end),
                          ("last half after the step", step + sc.phases_s[1] / 2, end)):
        part = [r for r in records if lo <= r.arrival_s < hi]
        m = compute_metrics(part, duration_s=hi - lo)
        answered = [r.threshold_used for r in part if r.threshold_used is not None and r.status.value == "ok"]
        out["phases"][label] = {
            "requests": m.num_requests, "offered_rps": m.num_requests / (hi - lo), "attainment": m.slo_attainment,
            "refused": m.refused_share, "errors": m.num_errors + m.num_timeouts,
            "p50_e2e_s": m.e2e_s.p50 if m.e2e_s else None, "p90_e2e_s": m.e2e_s.p90 if m.e2e_s else None,
            "p99_e2e_s": m.e2e_s.p99 if m.e2e_s else None, "goodput_rps": m.goodput_rps,
            "accuracy": (sum(accuracy_at(sc.profiles, t) for t in answered) / len(answered)) if answered else None,
            "mean_threshold": m.mean_threshold}
    t = 0.0
    while t < end - 1e-9:
        part = [r for r in records if t <= r.arrival_s < t + sc.bin_s]
        met = sum(r.slo_met for r in part)
        gpus = gpus_at(membership, t + sc.bin_s, initial_gpus)
        out["bins"].append({"t_s": t, "requests": len(part), "attainment": met / len(part) if part else None,
                            "gpus_serving_at_end": gpus})
        t += sc.bin_s
    return out


def gpus_at(membership: list[dict], t: float, default: int) -> int:
    serving = default
    for m in membership:
        if m["time_s"] <= t:
            serving = m["gpus_serving"]
    return serving


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.0f}"


def report(results: dict, meta: dict) -> list[str]:
    lines = [f"## {meta['scenario']}: {meta['note']}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items() if k not in ("scenario", "note")]
    systems = list(results)
    lines += ["", "### Per phase", "",
              "| phase | system | requests | offered req/s | SLO attainment | refused | p50 e2e ms | p90 e2e ms "
              "| accuracy (profile) | mean threshold |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in results[systems[0]]["summary"]["phases"]:
        for s in systems:
            p = results[s]["summary"]["phases"][phase]
            threshold = "-" if p["mean_threshold"] is None else f"{p['mean_threshold']:.3f}"
            lines.append(f"| {phase} | {s} | {p['requests']} | {p['offered_rps']:.2f} | {_pct(p['attainment'])} | "
                         f"{_pct(p['refused'])} | {_ms(p['p50_e2e_s'])} | {_ms(p['p90_e2e_s'])} | "
                         f"{_pct(p['accuracy'])} | {threshold} |")
    controlled = [s for s in systems if results[s]["membership"]]
    lines += ["", f"### SLO attainment over time ({meta['bin_s']} s bins by arrival; the step is at "
              f"{meta['phases_s'][0]} s; GPUs serving at the bin's end for the controlled systems)", "",
              "| t (s) | " + " | ".join(systems) + "".join(f" | GPUs {s}" for s in controlled) + " |",
              "|---:|" + "---:|" * (len(systems) + len(controlled))]
    for i, b in enumerate(results[systems[0]]["summary"]["bins"]):
        cells = [_pct(results[s]["summary"]["bins"][i]["attainment"]) for s in systems]
        cells += [str(results[s]["summary"]["bins"][i]["gpus_serving_at_end"]) for s in controlled]
        lines.append(f"| {b['t_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "### Requests in and out (no request lost)", "",
              "| system | arrivals | records | answered | refused | reconfigurations | rule violations | sim wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in systems:
        r = results[s]
        lines.append(f"| {s} | {meta['requests']} | {len(r['records'])} | {r['num_ok']} | "
                     f"{sum(x.status.value == 'refused' for x in r['records'])} | {r['num_reconfigurations']} | "
                     f"{len(r['violations'])} | {r['wall_s']:.1f} |")
    lines += ["", "### What the controller did (ticks with actions)", ""]
    for s in controlled:
        for h in results[s]["ticks"]:
            done = "" if h["is_complete"] else f" (stopped: {h['error']})"
            lines.append(f"- {s}, t = {h['time_s']:.1f} s, {h['kind']}: {h['reason']}{done}")
            acts = h["actions"]
            shown = acts if len(acts) <= 6 else [*acts[:5], f"... {len(acts) - 5} more"]
            lines += [f"  - `{a}`" for a in shown]
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="cpu-small,cpu-slow,gpu-32,gpu-64")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--fidelity", default="fast", choices=["fast", "step"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    date = datetime.date.today().isoformat()
    all_scenarios = scenarios()
    lines = [f"# The controller in the simulator: a load step ({date})", "",
             (__doc__ or "").split("\n\n", 1)[1].split("\nScenarios:")[0].strip(), "",
             f"Command: `.venv/bin/python scripts/bench_sim_controller.py --scenarios {args.scenarios} "
             f"--fidelity {args.fidelity} --seed {args.seed}`", ""]
    payload = {}
    for name in args.scenarios.split(","):
        sc = all_scenarios[name]
        trace = load_step_trace(sc.rate_rps, sc.phases_s, sc.prompt_tokens, sc.output_tokens, seed=args.seed)
        _, _, control, idle = build(sc, args.fidelity, args.seed)
        meta = {"scenario": name, "note": sc.note, "fidelity": args.fidelity, "requests": len(trace),
                "rate_rps": f"{sc.rate_rps:g} then {2 * sc.rate_rps:g}", "phases_s": list(sc.phases_s),
                "prompt_tokens": sc.prompt_tokens, "output_tokens": sc.output_tokens, "block_size": sc.block_size,
                "slo_scale": sc.slo_scale, "idle_latency_s": round(idle(sc.prompt_tokens, sc.output_tokens), 4),
                "quality_budget (points)": sc.quality_budget,
                "best accuracy (profile)": f"{100 * max(e.accuracy for e in sc.profiles.quality.settings()):.1f}%",
                "accuracy at 0.9 (profile)": f"{100 * accuracy_at(sc.profiles, BASE_THRESHOLD):.1f}%",
                "initial replicas": f"{sc.initial_replicas} x degree 1 at {BASE_THRESHOLD}", "gpus (budget)": sc.gpus,
                "startup_s": sc.startup_s, "true step cost / profile": sc.cost_scale, "profiles": sc.profiles.source or "planner default (illustrative)",
                "controller": {k: getattr(control.config, k) for k in (
                    "tick_s", "window_s", "period_s", "min_interval_s", "headroom", "rate_change",
                    "attainment_target")},
                "bin_s": sc.bin_s}
        results = {}
        for system in args.systems.split(","):
            run = run_system(system, sc, trace, args.fidelity, args.seed)
            initial = sc.gpus if SYSTEMS[system][3] == "max" else sc.initial_replicas
            run["summary"] = summarize(run["records"], sc, run["membership"], initial)
            results[system] = run
            ph = run["summary"]["phases"]
            print(f"{name} {system}: " + ", ".join(f"{k}: {_pct(v['attainment'])}" for k, v in ph.items())
                  + f" ({run['wall_s']:.1f} s)", flush=True)
        lines += report(results, meta)
        payload[name] = {"meta": meta, "results": {s: {k: v for k, v in r.items() if k != "records"}
                                                   for s, r in results.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"sim_controller_{date}{args.tag}.md"
    md.write_text("\n".join(lines))
    (out / f"sim_controller_{date}{args.tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    print("\n".join(lines))
    print("wrote", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
