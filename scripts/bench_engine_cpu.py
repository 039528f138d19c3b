"""CPU engine benchmark: 32 requests decoded in one continuous batch vs one by one.

Model: a random LLaDA-format model (``--shape``, default "tiny": d_model 64, 2 layers,
4 heads, SwiGLU 128, vocab 320), float32 on CPU, one torch thread. Every request: a random prompt of
``--prompt-len`` tokens, ``--max-tokens`` generated in blocks of ``--block``, dual cache, and either
fixed steps (``--tokens-per-step`` per step, so the work does not depend on the random weights) or,
with ``--threshold``, confidence-threshold unmasking over chunks of ``--chunk`` queries (random
weights are rarely confident: about one token a step, the decode-heavy regime where per-step
costs dominate). The reference generator row is left out with chunks smaller than the block (it
has no chunking).
Each mode runs ``--repeats`` times, interleaved (one by one, batched, reference, then again), and
the median run is reported, with the fastest and slowest: on a shared machine single runs vary.
Prints a markdown table and writes JSON + markdown under docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dilaserve.cli.init_model import SHAPES
from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.sampling_params import SamplingParams
from dilaserve.generation.reference import GenerationConfig, generate
from dilaserve.models.checkpoint import make_random_checkpoint
from dilaserve.models.registry import load_model


def drain(engine: Engine) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=None, help="threshold unmasking instead of fixed steps")
    parser.add_argument("--chunk", type=int, default=None, help="query chunk size with --threshold (default: block)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode; the median is reported")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--tag", default="", help="appended to the output files' names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(make_random_checkpoint(tempfile.mkdtemp(), "llada", **SHAPES[args.shape]))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (args.prompt_len,), generator=gen).tolist() for _ in range(args.requests)]
    if args.threshold is None:
        steps = args.max_tokens // args.tokens_per_step
        params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block, steps=steps, cache="dual")
        ref_config = GenerationConfig(gen_length=args.max_tokens, block_length=args.block, steps=steps, cache="dual")
        decoding = f"fixed steps ({args.tokens_per_step} tokens/step)"
    else:
        chunk = args.chunk or args.block
        params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block, threshold=args.threshold,
                                chunk_size=chunk, cache="dual")
        ref_config = GenerationConfig(gen_length=args.max_tokens, block_length=args.block, threshold=args.threshold,
                                      cache="dual") if chunk == args.block else None
        decoding = f"threshold {args.threshold}, chunks of {chunk}"
    config = EngineConfig(num_pages=4096, page_size=16)

    engine = Engine(model, config)
    engine.add(engine.make_request("warmup", prompts[0], params))
    drain(engine)

    def one_by_one(run: int) -> int:
        total = 0
        for i, p in enumerate(prompts):
            engine.add(engine.make_request(f"s{run}-{i}", p, params))
            total += drain(engine)
        return total

    def batched(run: int) -> int:
        for i, p in enumerate(prompts):
            engine.add(engine.make_request(f"b{run}-{i}", p, params))
        return drain(engine)

    # For context: the reference generator (plain, one request at a time, same settings).
    def reference(run: int) -> int:
        return sum(generate(model, p, ref_config).nfe for p in prompts)

    modes = {"sequential": one_by_one, "batched": batched}
    if ref_config is not None:
        modes["reference"] = reference
    times: dict[str, list[float]] = {name: [] for name in modes}
    num_steps: dict[str, int] = {}
    for run in range(args.repeats):
        for name in modes:
            t0 = time.perf_counter()
            num_steps[name] = modes[name](run)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    sequential_s, batched_s = median["sequential"], median["batched"]

    tokens = args.requests * args.max_tokens
    rows = [
        ("reference generator, one by one", "reference"),
        ("engine, one by one", "sequential"),
        (f"engine, batched ({args.requests} at once)", "batched"),
    ]
    rows = [(m, k, num_steps[k]) for m, k in rows if k in modes]
    result = {
        "benchmark": "bench_engine_cpu", "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "torch": torch.__version__, "settings": vars(args),
        "model": {"shape": args.shape, **SHAPES[args.shape], "params": model.spec.num_params()},
        "rows": [{"mode": m, "seconds": median[k], "seconds_min": min(times[k]), "seconds_max": max(times[k]),
                  "seconds_all": times[k], "steps": n, "requests_per_s": args.requests / median[k],
                  "tokens_per_s": tokens / median[k]}
                 for m, k, n in rows],
        "speedup": sequential_s / batched_s,
        "speedup_range": [min(times["sequential"]) / max(times["batched"]),
                          max(times["sequential"]) / min(times["batched"])],
        "speedup_vs_reference": median["reference"] / batched_s if "reference" in median else None,
    }
    lines = [
        f"# Engine on CPU: batched vs one by one ({result['date']}, {result['device']})", "",
        f"Random LLaDA-format model `{args.shape}` ({model.spec.num_params() / 1e6:.1f}M params), float32; "
        f"{args.requests} requests, prompt {args.prompt_len}, {args.max_tokens} generated, block {args.block}, "
        f"{decoding}, dual cache; median of {args.repeats} runs per mode.", "",
        "| mode | seconds (median) | min - max | engine steps | requests/s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {r['mode']} | {r['seconds']:.3f} | {r['seconds_min']:.3f} - {r['seconds_max']:.3f} | {r['steps']} "
          f"| {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} |" for r in result["rows"]),
        "", f"Speed-up of batching: **{result['speedup']:.1f}x** requests/s over the engine one by one "
        f"(worst to best pairing of runs: {result['speedup_range'][0]:.1f}x - {result['speedup_range'][1]:.1f}x)"
        + (f", {result['speedup_vs_reference']:.1f}x over the reference generator one by one."
           if result["speedup_vs_reference"] is not None else "."),
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_cpu_batching_{result['date']}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
