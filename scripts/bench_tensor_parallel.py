"""Tensor parallelism on one host: one TP=N instance against N TP=1 instances.

An LLaDA-8B-shaped model with random bf16 weights (the same weights at every degree: each rank
draws the full model from the seed, then keeps its shard), through the engine:

1. agreement: greedy decoding of the same prompts at TP=1 and TP=N; the share of output
   positions whose token agrees (bf16 sums in another order may flip near-ties);
2. batch-1 step latency: one request decoding alone, median wall time of an engine step
   (with random weights nearly every step commits one token, so nearly every step is a reuse
   step of the dual cache);
3. throughput at several loads: ``c`` requests kept in flight (a finished one is replaced at
   once) for ``--seconds`` after a warm-up, on one TP=N instance, then on N TP=1 instances run
   at the same time in N processes (one GPU each) with ``c / N`` requests each. Tokens/s counts
   committed output tokens; latency is per finished request.

    python3 scripts/bench_tensor_parallel.py --out DIR [--degree 2] [--concurrency 1,8,32,128]

``--tiny`` runs it on a toy model on CPUs (gloo, N processes) to check the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import build_engine
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.engine.tensor_parallel import ModelSource


def source_for(args) -> ModelSource:
    on_gpu = not args.tiny
    return ModelSource(random_shape="tiny" if args.tiny else "llada-8b", seed=0,
                       dtype="bfloat16" if on_gpu else "float32", device="cuda" if on_gpu else "cpu")


def engine_config(args, degree: int) -> EngineConfig:
    return EngineConfig(tensor_parallel=degree, kv_memory_gib=args.kv_memory_gib, max_batch_tokens=args.max_batch_tokens,
                        max_running=512, cuda_graphs=not args.no_graphs)


def params(args, max_tokens: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens or args.max_tokens, block_size=32, threshold=0.9, cache="dual")


def prompt(args, i: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 100 if args.tiny else 120000, (args.prompt_len,), generator=g).tolist()


def greedy_tokens(engine, args) -> dict[str, list[int]]:
    p = params(args, args.agreement_tokens)
    for i in range(args.agreement_prompts):
        engine.add(engine.make_request(f"agree{i}", prompt(args, i), p))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.token_ids)
    return out


def batch1_step_ms(engine, args) -> float:
    engine.add(engine.make_request("solo", prompt(args, 0), params(args, 128)))
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] or times) * 1e3


def closed_loop(engine, args, concurrency: int, tag: str, barrier=None) -> dict:
    """``concurrency`` requests kept in flight; warm-up, then ``args.seconds`` measured."""
    counter = [0]
    arrived: dict[str, float] = {}

    def add():
        rid = f"{tag}-{counter[0]}"
        engine.add(engine.make_request(rid, prompt(args, counter[0] % 64), params(args)))
        arrived[rid] = time.perf_counter()
        counter[0] += 1

    for _ in range(concurrency):
        add()
    if barrier is not None:  # instances on other GPUs start together
        barrier.wait()
    tokens, latencies, steps = 0, [], 0
    measuring, start = False, time.perf_counter()
    warm_until = start + args.warmup_seconds
    end = None
    while True:
        now = time.perf_counter()
        if not measuring and now >= warm_until:
            measuring, start, end = True, now, now + args.seconds
            tokens, latencies, steps = 0, [], 0
        if measuring and now >= end:
            break
        for o in engine.step():
            tokens += len(o.new_token_ids)
            if o.finished:
                latencies.append(time.perf_counter() - arrived.pop(o.request_id))
                add()
        steps += 1
    elapsed = time.perf_counter() - start
    for rid in list(arrived):
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return {"concurrency": concurrency, "seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "steps": steps, "step_ms": elapsed / max(steps, 1) * 1e3, "finished": len(latencies),
            "latency_p50_s": statistics.median(latencies) if latencies else None}


def _single_instance_worker(rank: int, args, levels: list[int], barrier, queue) -> None:
    """One TP=1 instance; the parent started it seeing only GPU ``rank`` (as its cuda:0)."""
    print(f"instance {rank}: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, building", flush=True)
    engine = build_engine(source_for(args), engine_config(args, 1))
    results = []
    for c in levels:
        share = max(1, c // args.degree)
        print(f"instance {rank}: {share} requests in flight", flush=True)
        results.append(closed_loop(engine, args, share, f"i{rank}-c{c}", barrier))
        print(f"instance {rank}: {results[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    queue.put((rank, results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--agreement-prompts", type=int, default=8)
    parser.add_argument("--agreement-tokens", type=int, default=128)
    parser.add_argument("--kv-memory-gib", type=float, default=24.0)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--no-graphs", action="store_true", help="run reuse steps eagerly at every degree")
    parser.add_argument("--parts", default="agreement,latency,throughput",
                        help="agreement, latency, throughput (TP=N, then N x TP=1); singles: only N x TP=1")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.kv_memory_gib = min(args.kv_memory_gib, 0.05)
    elif torch.cuda.device_count() < args.degree:
        raise SystemExit(f"--degree {args.degree} needs {args.degree} GPUs; {torch.cuda.device_count()} visible "
                         "(use --tiny to check the script on CPUs)")
    parts = set(args.parts.split(","))
    levels = [int(c) for c in args.concurrency.split(",")]
    device_name = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    result = {"device": device_name, "num_devices": args.degree, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "shape": "tiny" if args.tiny else "llada-8b", "degree": args.degree,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "cuda_graphs": not args.no_graphs}
    source = source_for(args)

    def run_degree(degree: int) -> dict:
        out: dict = {}
        t0 = time.perf_counter()
        engine = build_engine(source, engine_config(args, degree))
        out["build_s"] = time.perf_counter() - t0
        try:
            if "agreement" in parts:
                out["tokens"] = greedy_tokens(engine, args)
            if "latency" in parts:
                out["batch1_step_ms"] = batch1_step_ms(engine, args)
                print(f"TP={degree}: batch-1 step {out['batch1_step_ms']:.2f} ms", flush=True)
            if "throughput" in parts and degree > 1:
                out["throughput"] = [closed_loop(engine, args, c, f"tp-c{c}") for c in levels]
                for row in out["throughput"]:
                    print(f"TP={degree} c={row['concurrency']}: {row['tokens_per_s']:.0f} tok/s, "
                          f"step {row['step_ms']:.1f} ms", flush=True)
        finally:
            engine.close()
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return out

    single = run_degree(1)
    per_rank = {}
    if parts & {"throughput", "singles"}:
        # N TP=1 instances first: they need every GPU, and the TP=N run then starts afresh.
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(args.degree), ctx.Queue()
        procs = [ctx.Process(target=_single_instance_worker, args=(r, args, levels, barrier, queue))
                 for r in range(args.degree)]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(args.degree)]
        for rank, p in enumerate(procs):
            if not args.tiny:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[rank]  # the child sees one GPU
            p.start()
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        per_rank = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    multi = run_degree(args.degree) if parts - {"singles"} else {"build_s": None, "throughput": None}
    result["build_s"] = {"tp1": single["build_s"], f"tp{args.degree}": multi["build_s"]}
    if "agreement" in parts:
        same = total = 0
        first_diff = []
        for rid, ref in single["tokens"].items():
            got = multi["tokens"][rid]
            n = min(len(ref), len(got))
            same += sum(a == b for a, b in zip(ref[:n], got[:n]))
            total += max(len(ref), len(got))
            first_diff.append(next((i for i in range(n) if ref[i] != got[i]), n))
        result["agreement"] = {"positions": total, "agree": same, "share": same / total,
                               "first_divergence_per_prompt": first_diff}
        print(f"greedy agreement TP=1 vs TP={args.degree}: {same}/{total} = {same / total:.2%}", flush=True)
    if "latency" in parts:
        result["batch1_step_ms"] = {"tp1": single["batch1_step_ms"], f"tp{args.degree}": multi["batch1_step_ms"],
                                    "ratio": multi["batch1_step_ms"] / single["batch1_step_ms"]}
    if per_rank:
        rows = []
        for i, c in enumerate(levels):
            singles = [per_rank[r][i] for r in range(args.degree)]
            tp = multi["throughput"][i] if multi.get("throughput") else {"tokens_per_s": None, "step_ms": None,
                                                                      "latency_p50_s": None}
            lat = [s["latency_p50_s"] for s in singles if s["latency_p50_s"] is not None]
            rows.append({"concurrency": c, "tp_tokens_per_s": tp["tokens_per_s"], "tp_step_ms": tp["step_ms"],
                         "tp_latency_p50_s": tp["latency_p50_s"],
                         "singles_tokens_per_s": sum(s["tokens_per_s"] for s in singles),
                         "singles_step_ms": statistics.mean(s["step_ms"] for s in singles),
                         "singles_latency_p50_s": statistics.median(lat) if lat else None})
        result["throughput"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tensor_parallel_{result['shape']}_{device_name.replace(' ', '_')}x{args.degree}_{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Tensor parallel: {result['shape']} on {args.degree} x {device_name} ({result['date']})", ""]
    if "agreement" in result:
        a = result["agreement"]
        lines += [f"Greedy agreement TP=1 vs TP={args.degree}: {a['agree']}/{a['positions']} = {a['share']:.2%} "
                  f"(first divergence per prompt: {a['first_divergence_per_prompt']})", ""]
    if "batch1_step_ms" in result:
        b = result["batch1_step_ms"]
        lines += [f"Batch-1 engine step: TP=1 {b['tp1']:.2f} ms, TP={args.degree} {b[f'tp{args.degree}']:.2f} ms "
                  f"(ratio {b['ratio']:.2f})", ""]
    if "throughput" in result:
        lines += [f"| requests in flight | 1 x TP={args.degree} tok/s | {args.degree} x TP=1 tok/s | "
                  f"TP={args.degree} step ms | TP=1 step ms | TP={args.degree} p50 s | TP=1 p50 s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["throughput"]:
            lines.append(f"| {r['concurrency']} | {_n(r['tp_tokens_per_s'], 0)} | {r['singles_tokens_per_s']:.0f} | "
                         f"{_n(r['tp_step_ms'], 1)} | {r['singles_step_ms']:.1f} | {_s(r['tp_latency_p50_s'])} | "
                         f"{_s(r['singles_latency_p50_s'])} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _n(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    main()
