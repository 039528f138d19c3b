"""Load benchmark: decoding granularity under load, fixed blocks and chunks against adaptive.

Every mode runs the same workload through the real ``Engine`` (scheduler, model runner, KV
pages) on one device:

- ``block``: fixed chunk = the whole block (plain Fast-dLLM-style block decoding; 32 here,
  the block size from the config for a block-causal model: 4 for SDAR);
- ``chunk16`` / ``chunk8`` / ``chunk4`` / ``chunk2``: fixed chunks (Optimus's fixed
  granularities; those not smaller than the block are left out);
- ``ar1``: one position per step (the autoregressive-equivalent cost);
- ``adaptive``: the saturation-aware chunk controller (``chunk_control.AdaptiveChunk``) with
  the refresh bound derived from the latency profile (``refresh_bound="auto"``);
- ``adaptive_unbounded``: the same controller with refreshes batched without a bound (the
  phase-mixed batching ablation). The fixed modes also batch refreshes without a bound (only
  the step's token budget), as the published baselines do;
- ``block_phase_mixed``: whole blocks with the "auto" refresh bound (opt-in, ``--modes``).

``--steps-per-block N`` runs LLaDA's fixed-steps schedule instead of the threshold (block / N
tokens decided per step: #9's dLLM-Serve comparison at 4 tokens per step is ``--steps-per-block 8``);
the decisions then follow the schedule, not the acceptance profile, and only ``block`` and
``block_phase_mixed`` apply (the schedule queries the whole block).

Loads: closed-loop concurrency (``--concurrency``: c clients, each sending its next request
when the previous one finishes) and open-loop Poisson arrivals (``--rates`` requests/s, or
``auto``: fractions of the highest closed-loop request rate measured).

Random weights. On a GPU the model is LLaDA-8B-shaped with random bf16 weights: the step cost
does not depend on the weights, but what a step decides does. So the number of positions each
step commits is drawn from an *acceptance profile* measured on a trained model (the embedded
one, ``dilaserve profile acceptance``: per threshold and positions queried; the file is named
in the output), and the first ``k`` queried positions commit. The model still computes every
step in full (forward, logit budget, decisions), so every timing is real.

Reported per mode and load: decided tokens/s (over the measured window), p50 / p90 time per
output token, p99 end-to-end latency, peak transient memory per step (measured on CUDA above
the weights and KV pool; predicted by ``engine/memory.py`` everywhere) against materialising
full float32 logits for the same batch; and a plot of the adaptive controller's chunk choices
over time against load. JSON + markdown under ``--out``.

    python scripts/bench_load.py --out $OUT                 # GPU: LLaDA-8B shape, full run
    python scripts/bench_load.py --smoke --out /tmp/load    # CPU: tiny model, < 1 minute
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from dilaserve.engine.acceptance_profile import AcceptanceProfile
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.latency_profile import profile_dict, refresh_token_bound, save_profile
from dilaserve.engine.memory import StepMemoryModel
from dilaserve.engine.plan import Decision, StepOutput
from dilaserve.engine.profiling import Grid, measure_grid
from dilaserve.engine.random_model import SHAPES, build_model
from dilaserve.engine.scheduler import REFRESH_CATCH_UP
from dilaserve.engine.sampling_params import SamplingParams, default_cache
from dilaserve.models.paged_attention import PagedKVCache

# The shipped profile, by path: importing dilaserve.planner would need PuLP, which GPU images lack.
DEFAULT_ACCEPTANCE = (Path(__file__).resolve().parents[1] / "dilaserve" / "planner" / "default_profiles"
                      / "acceptance_dilaserve-tiny-arith.json")
MODES = {  # name: (chunk control, fixed chunk or None, refresh bound)
    "block": ("fixed", None, "unbounded"),
    "chunk16": ("fixed", 16, "unbounded"),
    "chunk8": ("fixed", 8, "unbounded"),
    "chunk4": ("fixed", 4, "unbounded"),
    "chunk2": ("fixed", 2, "unbounded"),
    "ar1": ("fixed", 1, "unbounded"),
    "adaptive": ("adaptive", None, "auto"),
    "adaptive_unbounded": ("adaptive", None, "unbounded"),
    "block_phase_mixed": ("fixed", None, "auto"),
}
# LLaDA's fixed-steps schedule queries the whole block each step: no chunking to compare.
STEPS_MODES = ("block", "block_phase_mixed")


class AcceptanceRunner:
    """The engine's model runner, with each step's decisions replaced by a draw from the
    acceptance profile (the first ``k`` queried positions commit); records every step."""

    def __init__(self, inner, acceptance: AcceptanceProfile, token_id: int, memory: StepMemoryModel, seed: int = 0):
        self.inner = inner
        self.acceptance = acceptance
        self.token_id = token_id
        self.memory = memory
        self.rng = np.random.default_rng(seed)
        self.steps: list[dict] = []
        self.t0 = time.perf_counter()

    def run(self, plan):
        out = self.inner.run(plan)
        decisions = {}
        for item in plan.items:
            r = item.request
            if r.params.steps is not None:  # the schedule sets the count
                k = r.scheduled_commits(len(item.query_positions))
            else:
                k = self.acceptance.draw(self.rng, r.threshold, len(item.query_positions))
            decisions[r.request_id] = Decision(item.query_positions[:k], (self.token_id,) * k)
        rows = sum(len(i.query_positions) for i in plan.items)
        predicted = self.memory.step_bytes(plan.num_tokens, rows, len(plan.items),
                                           max(i.num_tokens for i in plan.items),
                                           max(i.num_context_tokens for i in plan.items))
        self.steps.append({"t": time.perf_counter() - self.t0, "requests": len(plan.items),
                           "mean_chunk": statistics.fmean(i.chunk for i in plan.items), "tokens": plan.num_tokens,
                           "refresh_tokens": plan.num_refresh_tokens, "rows": rows, "seconds": out.elapsed_s,
                           "decided": sum(len(d.positions) for d in decisions.values()), "predicted_bytes": predicted,
                           "full_fp32_logit_bytes": plan.num_tokens * self.memory.vocab_size * 4})
        return StepOutput(decisions, out.elapsed_s)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_point(model, args, mode: str, load: dict, acceptance: AcceptanceProfile, latency_path: str | None,
              num_pages: int, seed: int) -> dict:
    """One mode at one load for ``args.duration_s`` seconds; returns its row."""
    control, chunk, refresh = MODES[mode]
    spec = model.spec
    config = EngineConfig(
        num_pages=num_pages, page_size=16, max_running=args.max_running, max_batch_tokens=args.max_batch_tokens,
        max_refresh_tokens=args.max_batch_tokens, refresh_bound="auto" if refresh == "auto" else "fixed",
        refresh_slowdown=args.refresh_slowdown, chunk_control=control, kernels=args.kernels,
        latency_profile=latency_path if control == "adaptive" or refresh == "auto" else None,
        acceptance_profile=str(args.acceptance) if control == "adaptive" else None,
        step_memory_gib=args.step_memory_gib, sparse_scratch_tokens=args.sparse_scratch_tokens)
    engine = Engine(model, config)
    dtype_bytes = next(model.parameters()).element_size()
    memory = StepMemoryModel.for_spec(spec, dtype_bytes, fused_logits=engine.runner.fast_path is not None,
                                      padded_attention=engine.runner.fast_path is None,
                                      block_ops=engine.runner.block_ops)
    token_id = min(spec.mask_token_id, spec.eos_token_id) - 1
    runner = AcceptanceRunner(engine.runner, acceptance, token_id, memory, seed)
    engine.runner = runner
    steps = args.steps_per_block * -(-args.max_tokens // args.block) if args.steps_per_block else None
    params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block,
                            threshold=None if steps else args.threshold, steps=steps,
                            chunk_size=chunk, cache=default_cache(spec.causal_block_size), min_chunk=1,
                            max_chunk=None, kv_retention=args.kv_retention)
    gen = torch.Generator().manual_seed(seed)
    high = min(spec.mask_token_id, spec.eos_token_id)

    def prompt() -> list[int]:
        return torch.randint(0, high, (args.prompt_len,), generator=gen).tolist()

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    if load["kind"] == "poisson":
        t = 0.0
        while t < args.duration_s:
            t += rng.exponential(1.0 / load["rate"])
            arrivals.append(t)
    info: dict[str, dict] = {}
    counter = [0]

    def add(at: float) -> None:
        rid = f"q{counter[0]}"
        counter[0] += 1
        deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
        engine.add(engine.make_request(rid, prompt(), params, deadline_s=deadline))
        info[rid] = {"arrival": at, "first": None, "finish": None, "tokens": 0}

    t0 = time.perf_counter()
    runner.t0 = t0
    if load["kind"] == "closed":
        for _ in range(load["concurrency"]):
            add(0.0)
    next_arrival = 0
    decided_in_window = 0
    while True:
        now = time.perf_counter() - t0
        if now >= args.duration_s:
            break
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= now:
            add(arrivals[next_arrival])
            next_arrival += 1
        if not engine.has_work():
            if next_arrival < len(arrivals):
                time.sleep(max(0.0, min(arrivals[next_arrival] - now, args.duration_s - now)))
                continue
            break
        outputs = engine.step()
        end = time.perf_counter() - t0
        if runner.steps and end >= args.warmup_s:
            decided_in_window += runner.steps[-1]["decided"]
        for out in outputs:
            rec = info[out.request_id]
            if out.new_token_ids and rec["first"] is None:
                rec["first"] = end
            rec["tokens"] = len(out.token_ids)
            if out.finished:
                rec["finish"] = end
                if load["kind"] == "closed" and end < args.duration_s:
                    add(end)
    elapsed = time.perf_counter() - t0
    window = max(min(elapsed, args.duration_s) - args.warmup_s, 1e-9)
    done = [r for r in info.values() if r["finish"] is not None]
    tpot = [(r["finish"] - r["first"]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1 and r["first"] is not None]
    e2e = [r["finish"] - r["arrival"] for r in done]
    # Requests still running at the end are left out of the percentiles; the oldest of them
    # says whether that leaves out the tail (then the p99 shown is only a lower bound).
    end_s = min(elapsed, args.duration_s)
    oldest = max((end_s - r["arrival"] for r in info.values() if r["finish"] is None), default=None)
    p99 = percentile(e2e, 99)
    steps = runner.steps
    row = {
        "mode": mode, "load": load, "chunk_control": control, "chunk": chunk, "refresh_bound": refresh,
        "seconds": elapsed, "window_s": window, "requests_added": len(info), "requests_finished": len(done),
        "decided_tokens_per_s": decided_in_window / window,
        "tpot_p50_ms": _ms(percentile(tpot, 50)), "tpot_p90_ms": _ms(percentile(tpot, 90)),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": p99, "oldest_unfinished_s": oldest,
        "e2e_p99_is_lower_bound": oldest is not None and (p99 is None or oldest > p99),
        "engine_steps": len(steps), "mean_step_ms": 1e3 * statistics.fmean(s["seconds"] for s in steps) if steps else None,
        "mean_requests_per_step": statistics.fmean(s["requests"] for s in steps) if steps else 0.0,
        "mean_chunk": statistics.fmean(s["mean_chunk"] for s in steps) if steps else None,
        "decided_per_request_step": (sum(s["decided"] for s in steps) / max(1, sum(s["requests"] for s in steps))),
        "predicted_peak_step_gib": max((s["predicted_bytes"] for s in steps), default=0) / 2**30,
        "full_fp32_logits_gib": max((s["full_fp32_logit_bytes"] for s in steps), default=0) / 2**30,
        "max_step_tokens": max((s["tokens"] for s in steps), default=0),
        "max_refresh_tokens_in_step": max((s["refresh_tokens"] for s in steps), default=0),
        "trace": [{k: s[k] for k in ("t", "requests", "mean_chunk", "tokens", "refresh_tokens")} for s in steps]
        if control == "adaptive" else [],
    }
    if device.type == "cuda":
        row["measured_peak_step_gib"] = (torch.cuda.max_memory_allocated() - baseline) / 2**30
    engine.runner = runner.inner
    del engine, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def load_label(load: dict) -> str:
    return f"c={load['concurrency']}" if load["kind"] == "closed" else f"poisson {load['rate']:.3g}/s"


def markdown(result: dict) -> str:
    s = result["settings"]
    sparse = "" if s.get("kv_retention") is None else f" with sparse KV (retention {s['kv_retention']:g})"
    steps = s.get("steps_per_block")
    weights = ("trained weights" if not result["random_weights"] else "random weights: the positions a step commits "
               + ("follow the fixed-steps schedule" if steps else "are drawn from the acceptance profile"))
    decoding = (f"fixed steps ({steps} a block: {s['block'] / steps:g} tokens decided per step, set by the "
                "schedule, not drawn)" if steps else f"threshold {s['threshold']}")
    lines = [
        f"# Load benchmark on {result['device']} ({result['date']})", "",
        f"Model: {result['model']} ({weights}). "
        f"Acceptance profile: `{result['acceptance_profile']}` (measured on {result['acceptance_model']}). "
        f"Latency profile: `{result['latency_profile']}` (held-out error: median "
        f"{result['latency_holdout'].get('median_rel_error', float('nan')):.1%}, max {result['latency_holdout'].get('max_rel_error', float('nan')):.1%}).",
        "",
        f"Workload: prompt {s['prompt_len']}, {s['max_tokens']} generated, block {s['block']}, {decoding}, "
        f"{result.get('cache', 'dual')} cache{sparse}; {s['duration_s']} s per point (first {s['warmup_s']} s not counted in tokens/s); "
        f"max batch tokens {s['max_batch_tokens']}. Refresh bound ('auto', slowdown {s['refresh_slowdown']}): "
        f"the larger of the slowdown term (at a reuse batch of 64 x block: "
        f"~{result.get('auto_refresh_tokens_at_64', '-')} tokens) and {REFRESH_CATCH_UP} x the batch's mean "
        "refresh demand per step (see `engine/scheduler.py`).",
        "",
        "| mode | load | decided tok/s | x block | p50 TPOT ms | p90 TPOT ms | p99 e2e s | mean chunk | finished | "
        "peak step GiB (measured / predicted) | full fp32 logits GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = ["", "p99 e2e is over the requests that finished inside the window; '>= x' marks a point where "
             "a request still running at the end had already waited x s, longer than that p99: the window "
             "cut off the tail, and only a longer --duration-s measures it."]
    base = {load_label(r["load"]): r["decided_tokens_per_s"] for r in result["rows"] if r.get("mode") == "block" and "skipped" not in r}

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def p99_cell(r: dict) -> str:
        """'>= x' where a request still running at the end had waited longer than the finished
        requests' p99 (x: that wait, or the p99 if larger): the window cut off the tail."""
        if not r.get("e2e_p99_is_lower_bound"):
            return f(r["e2e_p99_s"], ".2f")
        return f">= {max(r['oldest_unfinished_s'], r['e2e_p99_s'] or 0.0):.2f}"

    for r in result["rows"]:
        label = load_label(r["load"])
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['mode']} | {label} | {r.get('skipped') or r.get('error')} |")
            continue
        ratio = r["decided_tokens_per_s"] / base[label] if base.get(label) else None
        measured = r.get("measured_peak_step_gib")
        lines.append(
            f"| {r['mode']} | {label} | {r['decided_tokens_per_s']:.0f} | {f(ratio, '.2f')} | {f(r['tpot_p50_ms'], '.1f')} | "
            f"{f(r['tpot_p90_ms'], '.1f')} | {p99_cell(r)} | {f(r['mean_chunk'], '.1f')} | "
            f"{r['requests_finished']}/{r['requests_added']} | {f(measured, '.2f')} / {r['predicted_peak_step_gib']:.2f} | "
            f"{r['full_fp32_logits_gib']:.2f} |")
    if any(r.get("e2e_p99_is_lower_bound") for r in result["rows"]):
        lines += notes
    return "\n".join(lines) + "\n"


def plot_choices(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("mode") == "adaptive" and r.get("trace")]
    if not rows:
        return
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5))
    offset = 0.0
    for r in rows:
        t = [offset + s["t"] for s in r["trace"]]
        ax_t.plot(t, [s["mean_chunk"] for s in r["trace"]], lw=1, label=load_label(r["load"]))
        ax_n.scatter([s["requests"] for s in r["trace"]], [s["mean_chunk"] for s in r["trace"]], s=6,
                     label=load_label(r["load"]), alpha=0.6)
        offset = t[-1] if t else offset
    ax_t.set(xlabel="time across load points (s)", ylabel="mean chunk chosen", title="adaptive: chunk over time")
    ax_n.set(xscale="log", xlabel="requests in the step (load)", ylabel="mean chunk chosen",
             title="adaptive: chunk vs load")
    for ax in (ax_t, ax_n):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_latency_profile(model, args, out: Path, device_name: str) -> Path:
    """A small latency profile of this model on this device (the adaptive controller's input)."""
    seq = args.prompt_len + args.max_tokens
    batches = (1, 2, 4) if args.smoke else (1, 4, 16, 64, 128)
    if next(model.parameters()).is_cuda:  # the grid's KV cache holds its largest batch: keep it in memory
        spec = model.spec
        per_token = PagedKVCache.bytes_per_page(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                                next(model.parameters()).dtype) / 16
        fits = int(0.5 * torch.cuda.mem_get_info()[0] / per_token) // seq
        batches = tuple(b for b in batches if b <= fits) or (1,)
    chunks = tuple(c for c in ((1, 4, 8, 16, 32) if not args.smoke else (1, 8, 32)) if c < args.block) + (args.block,)
    grid = Grid(batch_sizes=batches, chunks=chunks, contexts=(seq,),
                block_size=args.block, max_step_tokens=args.max_batch_tokens, warmup=1, repeats=2 if args.smoke else 3)
    points = measure_grid(model, grid, kernels=args.kernels)
    meta = {"model": args.model_name, "device": device_name, "cache": default_cache(model.spec.causal_block_size),
            "block_size": args.block, "date": datetime.date.today().isoformat()}
    return save_profile(profile_dict(points, meta), out / f"latency_{args.model_name}_quick.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized: tiny model, short points (< 1 minute)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: llada-8b on CUDA, tiny otherwise")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated, of {', '.join(MODES)} (default: all but block_phase_mixed; "
                             f"with --steps-per-block: {', '.join(STEPS_MODES)})")
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--rates", default="auto", help="Poisson requests/s, comma-separated; 'auto': fractions "
                        "0.3,0.6,0.9 of the highest closed-loop request rate; '' for none")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--steps-per-block", type=int, default=None,
                        help="LLaDA's fixed-steps schedule (block / N tokens a step) instead of the threshold; "
                             f"modes {', '.join(STEPS_MODES)} only")
    parser.add_argument("--duration-s", type=float, default=20.0, help="per load point")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="not counted in tokens/s")
    parser.add_argument("--deadline-s", type=float, default=None, help="per-request deadline after arrival")
    parser.add_argument("--max-running", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--refresh-slowdown", type=float, default=1.0)
    parser.add_argument("--step-memory-gib", type=float, default=None)
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--acceptance", default=str(DEFAULT_ACCEPTANCE))
    parser.add_argument("--latency-profile", default=None, help="default: measure a quick one first")
    parser.add_argument("--reserve-gib", type=float, default=16.0, help="GPU memory kept free of KV pages")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip load points past this")
    parser.add_argument("--kv-retention", type=float, default=None,
                        help="head-centric sparse KV for every request (default: dense dual cache)")
    parser.add_argument("--sparse-scratch-tokens", type=int, default=0,
                        help="with --kv-retention: scratch slots so that prompts hold no pages")
    args = parser.parse_args()
    if args.modes is None:
        args.modes = ",".join(STEPS_MODES if args.steps_per_block else (m for m in MODES if m != "block_phase_mixed"))
    unknown = [m for m in args.modes.split(",") if m and m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.steps_per_block is not None:
        if args.steps_per_block < 1:
            parser.error(f"--steps-per-block must be >= 1, got {args.steps_per_block}")
        other = [m for m in args.modes.split(",") if m and m not in STEPS_MODES]
        if other:
            parser.error(f"with --steps-per-block only {', '.join(STEPS_MODES)} apply (the schedule queries the "
                         f"whole block); not {', '.join(other)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.prompt_len, args.max_tokens, args.duration_s, args.warmup_s = 16, 64, 1.0, 0.2
        args.concurrency, args.rates = "1,8", "auto"
        args.max_batch_tokens = min(args.max_batch_tokens, 2048)
        torch.set_num_threads(1)  # a small model on shared cores: spinning OpenMP threads only add noise
    shape_name = args.shape or ("llada-8b" if device.type == "cuda" else "tiny")
    args.model_name = f"{shape_name}-random"
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    torch.manual_seed(0)
    model = build_model(SHAPES[shape_name], device)
    if model.spec.causal_block_size:  # block-causal (SDAR): the model's own block, exact cache
        args.block = model.spec.causal_block_size
    if args.steps_per_block is not None and args.steps_per_block > args.block:
        raise SystemExit(f"--steps-per-block {args.steps_per_block} exceeds the block ({args.block}): "
                         "some steps would decide nothing")
    acceptance = AcceptanceProfile.load(args.acceptance)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    log(f"{args.model_name} on {device_name}; acceptance {args.acceptance}")
    latency_path = Path(args.latency_profile) if args.latency_profile else quick_latency_profile(model, args, out, device_name)
    latency = json.loads(latency_path.read_text())
    log(f"latency profile {latency_path}: held-out median {latency.get('holdout', {}).get('median_rel_error', float('nan')):.1%}")
    spec = model.spec
    seq = args.prompt_len + args.max_tokens
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    per_page = PagedKVCache.bytes_per_page(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                           next(model.parameters()).dtype)
    wanted = max(concurrencies + [args.max_running]) * -(-seq // 16) + 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num_pages = max(1, min(wanted, int((free - args.reserve_gib * 2**30) // per_page)))
    else:
        num_pages = wanted
    from dilaserve.engine.cost_model import StepCost, StepShape

    cost = StepCost(**latency["fit"])
    reuse64 = StepShape(64 * args.block, 64 * seq, 64 * args.block * seq, 64 * args.block, 64)
    date = datetime.date.today().isoformat()
    slug = "".join(ch if ch.isalnum() else "_" for ch in device_name.lower()).strip("_")
    sparse = f"_kv{args.kv_retention:g}" if args.kv_retention is not None else ""
    fixed = f"_steps{args.steps_per_block}" if args.steps_per_block else ""
    stem = out / f"load_{slug}_{date}{sparse}{fixed}{'_smoke' if args.smoke else ''}"
    result = {
        "benchmark": "bench_load", "date": date, "device": device_name, "model": args.model_name,
        "random_weights": True, "cache": default_cache(spec.causal_block_size),
        "acceptance_profile": str(args.acceptance),
        "acceptance_model": acceptance.data.get("model", "?"), "latency_profile": str(latency_path),
        "latency_fit": latency["fit"], "latency_holdout": latency.get("holdout", {}), "kv_pages": num_pages,
        "auto_refresh_tokens_at_64": refresh_token_bound(cost, reuse64, seq, args.refresh_slowdown),
        "settings": {k: v for k, v in vars(args).items()}, "torch": torch.__version__, "rows": [],
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        # with_name, not with_suffix: a retention's "0.5" in the stem is no suffix to replace
        stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=1))
        stem.with_name(stem.name + ".md").write_text(markdown(result))
        plot_choices(result, stem.with_name(stem.name + "_chunks.png"))

    modes = [m for m in args.modes.split(",") if m and (MODES[m][1] is None or MODES[m][1] < args.block)]
    # Warm-up (kernel compilation, allocator) outside the timed points.
    warm = argparse.Namespace(**{**vars(args), "duration_s": min(2.0, args.duration_s / 2), "warmup_s": 0.0})
    for mode in ("block",) if args.steps_per_block else ("block", "adaptive"):
        run_point(model, warm, mode, {"kind": "closed", "concurrency": 2}, acceptance, str(latency_path), num_pages, 0)
    log("warm-up done")
    loads = [{"kind": "closed", "concurrency": c} for c in concurrencies]

    def run_loads(loads: list[dict]) -> None:
        for load in loads:
            for mode in modes:
                if time.perf_counter() - start + args.duration_s * 1.5 > args.budget_s:
                    result["rows"].append({"mode": mode, "load": load, "skipped": "time budget"})
                    continue
                try:
                    row = run_point(model, args, mode, load, acceptance, str(latency_path), num_pages, seed=len(result["rows"]))
                    result["rows"].append(row)
                    log(f"{mode:18} {load_label(load):16} {row['decided_tokens_per_s']:8.0f} tok/s, mean chunk "
                        f"{row['mean_chunk'] or 0:5.1f}, p99 e2e {row['e2e_p99_s'] or float('nan'):.2f} s, "
                        f"{row['requests_finished']} finished")
                except Exception as exc:  # noqa: BLE001 - keep the other points of a device run
                    traceback.print_exc()
                    result["rows"].append({"mode": mode, "load": load, "error": repr(exc)})
                save()

    run_loads(loads)
    if args.rates == "auto":
        closed = [r for r in result["rows"] if "skipped" not in r and "error" not in r]
        best = max((r["requests_finished"] / r["seconds"] for r in closed), default=0.0)
        rates = [round(f * best, 3) for f in (0.3, 0.6, 0.9)] if best > 0 else []
        if args.smoke:
            rates = rates[1:2]
    else:
        rates = [float(x) for x in args.rates.split(",") if x]
    run_loads([{"kind": "poisson", "rate": r} for r in rates if r > 0])
    save()
    print(markdown(result))
    log(f"wrote {stem}.json, .md and _chunks.png")


if __name__ == "__main__":
    main()
