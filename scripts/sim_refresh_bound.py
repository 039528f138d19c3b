"""Simulated load benchmark: closed-loop concurrency or open-loop arrivals on one replica, refresh bound "fixed"
(unbounded) vs "auto" (phase-mixed), on the engine's real scheduler with simulated time.

A closed-loop point keeps ``c`` requests in flight (a finished request is replaced at once),
like ``scripts/bench_load.py``'s; an open-loop point draws arrivals at a rate, with gaps of a
chosen burstiness (Gamma, ``--burst-cv``). Steps take the time a latency profile
predicts (``--latency``: a ``dilaserve profile latency`` JSON measured on a GPU) and decide the
tokens an acceptance model draws from a quality profile (``--quality``), through
``sim.step_replica.StepReplica`` (the engine core with a simulated runner). So it runs in
seconds on a CPU, and shows what the policies do for a GPU and a model before device time is
spent. Reports decided tokens/s (positions committed after ``--warmup-s``), and p50 / p99
end-to-end latency and p50 / p90 / p99 time per output token of the requests finishing after it,
averaged over ``--seeds`` runs; writes JSON + markdown under ``--out``. ``--steps-per-block``
runs LLaDA's fixed-steps schedule instead of the threshold (the issue's 4 tokens per step).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.cost_model import StepCost
from dilaserve.engine.request import Request
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.sim.acceptance import AcceptanceModel
from dilaserve.sim.config import ReplicaGroup
from dilaserve.sim.step_replica import MASK_ID, StepReplica

ROOT = Path(__file__).resolve().parents[1]
UNBOUNDED_TOKENS = 1 << 20  # the default step budget: no step is ever cut by it


def run_point(cost: StepCost, acceptance: AcceptanceModel, load: tuple[str, float], bound: str, args,
              seed: int) -> dict:
    """One load point: ("closed", c) keeps c requests in flight; ("gamma", rate) arrivals at
    ``rate`` req/s with gaps of coefficient of variation ``--burst-cv`` (bursts: > 1)."""
    config = EngineConfig(num_pages=1 << 16, page_size=16, max_batch_tokens=args.max_batch_tokens,
                          max_refresh_tokens=args.max_batch_tokens,
                          max_running=1 << 12, refresh_bound=bound, refresh_slowdown=args.refresh_slowdown)
    replica = StepReplica("sim", ReplicaGroup("sim", cost=cost, engine=config), acceptance, seed)
    steps = None if args.steps_per_block is None else args.steps_per_block * -(-args.max_tokens // args.block)
    params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block, cache="dual",
                            threshold=None if steps else args.threshold, steps=steps)
    arrived: dict[str, float] = {}

    def add(now: float) -> None:
        request_id = str(len(arrived))
        arrived[request_id] = now
        replica.scheduler.add(Request(request_id, [0] * args.prompt_len, params, MASK_ID, frozenset(), now, None,
                                      threshold=args.threshold))

    kind, value = load
    if kind == "closed":
        for _ in range(int(value)):
            add(0.0)
        pending = []
    else:  # open loop: the arrival times, drawn up front
        rng = np.random.default_rng(seed + 7919)
        shape = 1.0 / args.burst_cv ** 2
        gaps = rng.gamma(shape, 1.0 / (shape * value), size=int(value * args.duration_s * 2) + 10)
        pending = [t for t in np.cumsum(gaps).tolist() if t < args.duration_s][::-1]
    now, e2e, tpot, decided = 0.0, [], [], 0
    while now < args.duration_s:
        while pending and pending[-1] <= now:
            add(pending.pop())
        end = replica.start_step(now)
        if end is None:
            if not pending:
                break
            now = pending[-1]  # idle until the next arrival
            continue
        if end >= args.warmup_s:  # positions committed in the measured window (as bench_load counts them)
            decided += sum(len(d.positions) for d in replica.step_output.decisions.values())
        finished = replica.finish_step(end)
        now = end
        for request in finished:
            if now >= args.warmup_s:  # finished in the measured window
                e2e.append(now - arrived[request.request_id])
                tpot.append((now - request.first_token_s) / max(1, args.max_tokens - 1))
            if kind == "closed":
                add(now)
    measured_s = now - args.warmup_s
    if not e2e:
        raise SystemExit(f"{kind} {value}: no request finished after the warm-up; raise --duration-s")
    return {"tokens_per_s": decided / measured_s if measured_s > 0 else 0.0,
            "p50_e2e_s": float(np.percentile(e2e, 50)), "p99_e2e_s": float(np.percentile(e2e, 99)),
            "p50_tpot_ms": 1e3 * float(np.percentile(tpot, 50)), "p90_tpot_ms": 1e3 * float(np.percentile(tpot, 90)),
            "p99_tpot_ms": 1e3 * float(np.percentile(tpot, 99)), "finished": len(e2e)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", default=str(ROOT / "docs/benchmarks/latency_llada-8b-random_quick_nvidia_h200_2026-12-04.json"))
    parser.add_argument("--quality", default=str(ROOT / "dilaserve/planner/default_profiles/quality.json"))
    parser.add_argument("--concurrency", default="16,64,256", help="closed-loop points ('' for none)")
    parser.add_argument("--rates", default="", help="open-loop points: arrivals per second, comma-separated")
    parser.add_argument("--burst-cv", type=float, default=1.0, help="open loop: CV of the gaps (1: Poisson)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--steps-per-block", type=int, default=None,
                        help="LLaDA's fixed-steps schedule (block / this many tokens a step) instead of the threshold")
    parser.add_argument("--max-batch-tokens", type=int, default=UNBOUNDED_TOKENS,
                        help="the step's token budget (default: unbounded; bench_load uses 16384)")
    parser.add_argument("--refresh-slowdown", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=120.0, help="simulated seconds per point")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="requests finishing earlier are not counted")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="sim-out")
    args = parser.parse_args()
    cost = StepCost.from_profile(args.latency)
    acceptance = AcceptanceModel.from_quality_profile(args.quality)
    loads = [("closed", float(c)) for c in args.concurrency.split(",") if c]
    loads += [("gamma", float(r)) for r in args.rates.split(",") if r]
    rows = []
    for load in loads:
        label = f"c={load[1]:.0f}" if load[0] == "closed" else f"{load[1]:g} req/s (CV {args.burst_cv:g})"
        for bound in ("fixed", "auto"):
            runs = [run_point(cost, acceptance, load, bound, args, seed) for seed in range(args.seeds)]
            row = {"load": label, "refresh_bound": bound, **{k: float(np.mean([r[k] for r in runs])) for k in runs[0]}}
            rows.append(row)
            print(f"{label:>22} {bound:5s} {row['tokens_per_s']:8.0f} tok/s  p99 e2e {row['p99_e2e_s']:6.2f} s  "
                  f"p99 TPOT {row['p99_tpot_ms']:6.1f} ms", flush=True)
    tokens_per_step = (args.block / args.steps_per_block if args.steps_per_block
                       else acceptance.mean(args.threshold, args.block))
    decoding = (f"fixed steps, {tokens_per_step:g} tokens decided per step" if args.steps_per_block else
                f"quality profile `{Path(args.quality).name}` ({tokens_per_step:.2f} tokens decided per step at "
                f"threshold {args.threshold})")
    result = {"benchmark": "sim_refresh_bound", "date": datetime.date.today().isoformat(), "settings": vars(args),
              "tokens_per_step": tokens_per_step, "rows": rows}
    lines = [
        f"# Simulated closed loop: unbounded vs phase-mixed refreshes ({result['date']})", "",
        f"Latency profile `{Path(args.latency).name}`, {decoding}; prompt "
        f"{args.prompt_len}, {args.max_tokens} generated, block {args.block}, dual cache; {args.duration_s:.0f} "
        f"simulated s per point (requests finishing in the first {args.warmup_s:.0f} s not counted), mean of {args.seeds} seeds.", "",
        "| load | refresh bound | decided tok/s | p50 / p99 e2e s | p50 / p90 / p99 TPOT ms |",
        "|---|---|---:|---:|---:|",
        *(f"| {r['load']} | {'unbounded' if r['refresh_bound'] == 'fixed' else 'phase-mixed (auto)'} | "
          f"{r['tokens_per_s']:.0f} | {r['p50_e2e_s']:.2f} / {r['p99_e2e_s']:.2f} | "
          f"{r['p50_tpot_ms']:.1f} / {r['p90_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} |" for r in rows),
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    what = f"steps{args.steps_per_block}" if args.steps_per_block else Path(args.quality).stem
    if args.max_batch_tokens != UNBOUNDED_TOKENS:
        what += f"_budget{args.max_batch_tokens}"
    stem = f"sim_refresh_bound_{what}_{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
