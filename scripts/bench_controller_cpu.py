"""CPU replay with a load step: one static replica against the controller, on real Ray Serve.

    .venv/bin/python scripts/bench_controller_cpu.py [--rate 2.2] [--phase-s 45 75]

The embedded model (dilaserve-tiny-arith) serves checkable arithmetic prompts padded to
``--prompt-tokens`` through the chat API. The trace is Poisson at ``--rate`` for the first
phase, then at twice that. Both systems start from one replica (threshold 0.9) in its own
Serve application; "controller" runs the detached controller with 2 replica slots, the
latency profile fitted here from the engine's own cost model on one CPU thread, and the
model's measured quality profile. Deadlines: ``--slo-scale`` x a calibrated idle latency,
sent with every request (admission may refuse, which counts as a miss). Writes
docs/benchmarks/controller_cpu_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "dilaserve/assets/models/dilaserve-tiny-arith"
QUALITY = MODEL_DIR / "quality_profile.json"  # measured: docs/benchmarks/quality_dilaserve-tiny-arith_cpu_2026-11-22/
# What each system runs: routing, admission, the controller, replicas at the start.
SYSTEMS = {
    "static": ("power_of_two", False, False, 1),  # the baseline: threshold 0.9, no admission
    "static-2": ("power_of_two", False, False, 2),  # two replicas throughout: the upper bound
    "controller": ("power_of_two", False, True, 1),  # the controller alone
    "dilaserve": ("slack", True, True, 1),  # DiLaServe's defaults: slack routing, admission, controller
}
APP = "bench"


def fit_latency_profile(prompt_tokens: int, max_tokens: int, block_size: int) -> dict:
    """The engine's online cost model after batches of 1..8 requests of this shape, on one thread."""
    import torch

    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from dilaserve.engine.sampling_params import SamplingParams
    from dilaserve.eval.quality import encode_prompt
    from dilaserve.models.registry import load_model
    from dilaserve.models.tokenizer import load_tokenizer
    from dilaserve.replay.prompts import TaskPromptBuilder, tokenizer_counter

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(MODEL_DIR)
    config = EngineConfig(kv_memory_gib=0.25)
    engine = Engine(load_model(str(MODEL_DIR), device="cpu", dtype=torch.float32), config)
    builder = TaskPromptBuilder("arith", count_tokens=tokenizer_counter(MODEL_DIR), split="train")
    rng = random.Random(1)
    params = SamplingParams(max_tokens=max_tokens, block_size=block_size, threshold=0.9)
    n = 0
    for batch in (1, 2, 4, 8, 1, 3, 6, 8) * 2:
        for _ in range(batch):
            text, _ = builder.build(prompt_tokens, rng)
            engine.add(engine.make_request(f"fit-{n}", encode_prompt(tokenizer, text), params))
            n += 1
        while engine.has_work():
            engine.step()
    cost = engine.cost.cost
    return {"model": "dilaserve-tiny-arith", "device": "cpu (1 thread)", "cache": "dual", "illustrative": False,
            "degrees": [{"degree": 1, "fixed_s": cost.fixed_s, "per_token_s": cost.per_token_s,
                         "per_context_s": cost.per_context_s, "max_running": config.max_running,
                         "kv_capacity_tokens": engine.allocator.num_pages * config.page_size}]}


def serve_config(port: int, max_tokens: int, block_size: int, routing: str = "power_of_two",
                 admission: bool = False):
    from dilaserve.serving.config import parse_config

    return parse_config({
        "routing": {"policy": routing},
        "admission": {"enabled": admission},
        "app_name": APP,
        "models": [{"name": "dilaserve-tiny-arith", "path": str(MODEL_DIR)}],
        "variants": [{"name": "cpu", "model": "dilaserve-tiny-arith", "num_replicas": 1, "num_cpus_per_replica": 1,
                      "threshold": 0.9, "engine": {"kv_memory_gib": 0.25}}],
        "http": {"host": "127.0.0.1", "port": port, "ingress_num_cpus": 0.5},
        "defaults": {"max_tokens": max_tokens, "block_length": block_size},
    }, "bench config")


def make_trace(rate: float, phases_s: tuple[float, float], prompt_tokens: int, max_tokens: int, seed: int):
    from dilaserve.replay.synthetic import FixedLength, IndependentLengths, PoissonArrivals, synthesize
    from dilaserve.replay.trace import Trace, TraceRequest

    lengths = IndependentLengths(FixedLength(prompt_tokens), FixedLength(max_tokens))
    first = synthesize(PoissonArrivals(rate), lengths, duration_s=phases_s[0], seed=seed)
    second = synthesize(PoissonArrivals(2 * rate), lengths, duration_s=phases_s[1], seed=seed + 1)
    shifted = [TraceRequest(r.arrival_s + phases_s[0], r.prompt_tokens, r.output_tokens) for r in second]
    return Trace(tuple(first) + tuple(shifted), name=f"step {rate:g}->{2 * rate:g} req/s")


def remove_apps() -> None:
    from ray import serve

    for name in list(serve.status().applications):
        if name == APP or name.startswith(f"{APP}--"):
            serve.delete(name)


def run_system(name: str, controller_config, trace, baseline, args) -> dict:
    import ray

    from dilaserve.controller.actor import get_controller, start_controller, stop_controller
    from dilaserve.controller.deploy import deploy_controlled
    from dilaserve.replay.client import ReplayConfig, replay_async
    from dilaserve.replay.prompts import TaskPromptBuilder, tokenizer_counter

    remove_apps()
    routing, admission, use_controller, replicas = SYSTEMS[name]
    config = serve_config(args.port, args.max_tokens, args.block_size, routing, admission)
    variant = dataclasses.replace(config.variants[0], num_replicas=replicas)
    config = dataclasses.replace(config, variants=(variant,))
    deploy_controlled(config)
    if use_controller:
        start_controller(config, controller_config)
        time.sleep(2 * controller_config.tick_s)
    replay_config = ReplayConfig(endpoint=f"http://127.0.0.1:{config.http.port}", api="chat", system=name,
                                 slo_scale=args.slo_scale, show_progress=False, seed=args.seed)
    builder = TaskPromptBuilder("arith", count_tokens=tokenizer_counter(MODEL_DIR), seed=args.seed)
    start = time.monotonic()
    records = asyncio.run(replay_async(trace, replay_config, builder, baseline=baseline))
    history = []
    if use_controller:
        status = ray.get(get_controller().status.remote())
        history = [{**h, "t_s": h["time_s"] - start} for h in status["events"]]
        stop_controller()
    return {"records": records, "history": history}


def summarize(records, phases_s, bin_s: float) -> dict:
    from dilaserve.replay.metrics import compute_metrics

    end = phases_s[0] + phases_s[1]
    out = {"phases": {}, "bins": []}
    for label, lo, hi in (("before the step", 0.0, phases_s[0]), ("after the step", phases_s[0], end),
                          ("last half after the step", phases_s[0] + phases_s[1] / 2, end)):
        part = [r for r in records if lo <= r.arrival_s < hi]
        m = compute_metrics(part, duration_s=hi - lo)
        out["phases"][label] = {
            "requests": m.num_requests, "offered_rps": m.num_requests / (hi - lo), "attainment": m.slo_attainment,
            "refused": m.refused_share, "errors": m.num_errors + m.num_timeouts,
            "p50_e2e_s": m.e2e_s.p50 if m.e2e_s else None, "p90_e2e_s": m.e2e_s.p90 if m.e2e_s else None,
            "accuracy": m.accuracy, "mean_threshold": m.mean_threshold,
            "first_error": next((r.error for r in part if r.error), None)}
    t = 0.0
    while t < end:
        part = [r for r in records if t <= r.arrival_s < t + bin_s]
        met = sum(r.slo_met for r in part)
        out["bins"].append({"t_s": t, "requests": len(part), "attainment": met / len(part) if part else None})
        t += bin_s
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.0f}"


def write_report(results: dict, meta: dict, out_dir: Path, tag: str = "") -> Path:
    date = datetime.date.today().isoformat()
    systems = list(results)
    lines = [f"# Controller on CPU: a load step ({date})", "",
             "`scripts/bench_controller_cpu.py` — real Ray Serve on 127.0.0.1, the embedded "
             "`dilaserve-tiny-arith` model, checkable arithmetic prompts through `/v1/chat/completions`, "
             "open-loop Poisson arrivals whose rate doubles mid-trace. Every system starts from replicas at "
             "threshold 0.9 (1 CPU thread each); the controller may run 2 replicas. static: one replica, "
             "power-of-two routing, no admission (the baseline); static-2: two replicas throughout (the upper "
             "bound); controller: the controller with the baseline's routing; dilaserve: the controller with "
             "slack routing and admission (refusals count as misses). Machine: "
             f"{meta['cpus']} CPU cores.", "",
             "| setting | value |", "|---|---|"]
    for k, v in meta.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Per phase", "",
              "| phase | system | requests | offered req/s | SLO attainment | refused | p50 e2e ms | p90 e2e ms "
              "| accuracy | mean threshold |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in results[systems[0]]["summary"]["phases"]:
        for s in systems:
            p = results[s]["summary"]["phases"][phase]
            threshold = "-" if p["mean_threshold"] is None else f"{p['mean_threshold']:.2f}"
            lines.append(f"| {phase} | {s} | {p['requests']} | {p['offered_rps']:.2f} | {_pct(p['attainment'])} | "
                         f"{_pct(p['refused'])} | {_ms(p['p50_e2e_s'])} | {_ms(p['p90_e2e_s'])} | "
                         f"{_pct(p['accuracy'])} | {threshold} |")
    lines += ["", f"## SLO attainment over time ({meta['bin_s']} s bins by arrival; the step is at "
              f"{meta['phases_s'][0]} s)", "", "| t (s) | " + " | ".join(systems) + " |",
              "|---:|" + "---:|" * len(systems)]
    for i, b in enumerate(results[systems[0]]["summary"]["bins"]):
        cells = [_pct(results[s]["summary"]["bins"][i]["attainment"]) for s in systems]
        lines.append(f"| {b['t_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "## What the controller did", ""]
    for s in systems:
        for h in results[s]["history"]:
            lines.append(f"- {s}, t = {h['t_s']:.1f} s, {h['kind']}: {h['reason']}")
            lines += [f"  - `{a}`" for a in h["actions"]]
    lines.append("")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"controller_cpu_{date}{tag}.md"
    path.write_text("\n".join(lines))
    (out_dir / f"controller_cpu_{date}{tag}.json").write_text(json.dumps(
        {"meta": meta, "results": {s: {"summary": r["summary"], "history": r["history"]}
                                   for s, r in results.items()}}, indent=1, default=str))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=2.2, help="req/s before the step (doubles after it)")
    p.add_argument("--phase-s", type=float, nargs=2, default=(45.0, 75.0))
    p.add_argument("--prompt-tokens", type=int, default=800)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--slo-scale", type=float, default=4.0)
    p.add_argument("--quality-budget", type=float, default=2.0)
    p.add_argument("--bin-s", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="static,dilaserve,static-2",
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (see SYSTEMS)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import os

    import ray
    from ray import serve

    from dilaserve.controller.config import ControllerConfig
    from dilaserve.replay.client import ReplayConfig, calibrate_baseline
    from dilaserve.replay.prompts import TaskPromptBuilder, tokenizer_counter

    profiles = Path(tempfile.mkdtemp(prefix="controller-bench-"))
    latency = fit_latency_profile(args.prompt_tokens, args.max_tokens, args.block_size)
    (profiles / "latency.json").write_text(json.dumps(latency))
    shutil.copy(QUALITY, profiles / "quality.json")
    print("fitted latency profile:", latency["degrees"][0], flush=True)

    config = serve_config(args.port, args.max_tokens, args.block_size)
    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    trace = make_trace(args.rate, tuple(args.phase_s), args.prompt_tokens, args.max_tokens, args.seed)
    controller_config = ControllerConfig(
        gpus=2, profiles_dir=str(profiles), slo_scale=args.slo_scale, quality_budget=args.quality_budget,
        tick_s=1.0, window_s=10.0, period_s=5.0, min_interval_s=30.0, headroom=0.2, start_timeout_s=300.0,
        drain_timeout_s=60.0)
    try:
        from dilaserve.controller.deploy import deploy_controlled

        remove_apps()
        deploy_controlled(config)
        calibration = ReplayConfig(endpoint=f"http://127.0.0.1:{args.port}", api="chat", show_progress=False)
        builder = TaskPromptBuilder("arith", count_tokens=tokenizer_counter(MODEL_DIR), split="train")
        baseline = asyncio.run(calibrate_baseline(calibration, builder, [(args.prompt_tokens, args.max_tokens)],
                                                  repeats=8))
        print("idle latency:", baseline, flush=True)
        results = {}
        for name in args.systems.split(","):
            run = run_system(name, controller_config, trace, baseline, args)
            run["summary"] = summarize(run["records"], tuple(args.phase_s), args.bin_s)
            results[name] = run
            print(name, json.dumps(run["summary"]["phases"], indent=1), flush=True)
    finally:
        remove_apps()
        serve.shutdown()
        ray.shutdown()
    meta = {"cpus": os.cpu_count(), "rate_rps": f"{args.rate:g} then {2 * args.rate:g}",
            "phases_s": list(args.phase_s), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "block_size": args.block_size, "systems (routing, admission, controller, replicas)": {n: SYSTEMS[n] for n in args.systems.split(",")},
            "slo_scale": args.slo_scale, "quality_budget": args.quality_budget,
            "idle_latency_s": f"{baseline(args.prompt_tokens, args.max_tokens):.3f}", "bin_s": args.bin_s,
            "fitted step cost": latency["degrees"][0],
            "controller": {k: getattr(controller_config, k) for k in (
                "gpus", "tick_s", "window_s", "period_s", "min_interval_s", "headroom")}}
    print("wrote", write_report(results, meta, Path(args.out), args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
