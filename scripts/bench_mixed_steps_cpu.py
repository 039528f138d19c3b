"""CPU benchmark: phase-mixed steps (prefills and refreshes among reuse steps), attention as one
padded batch vs in groups of similar query counts.

Requests arrive ``--arrivals-per-step`` per engine step, so new prompts' prefills (every position
queried) share steps with running requests' reuse steps (a chunk of queries). With one padded
batch every request of such a step computes as many query rows as the longest prefill.
Model: a random LLaDA-format model (``--shape``), float32, threshold unmasking over chunks of
``--chunk``, dual cache, prompts of random length in [``--min-prompt``, ``--max-prompt``].
Each mode runs ``--repeats`` times, interleaved; the median is reported.
Prints a markdown table and writes JSON + markdown under ``--out``.
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
from dilaserve.models.checkpoint import make_random_checkpoint
from dilaserve.models.paged_attention import PagedAttention
from dilaserve.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--arrivals-per-step", type=int, default=2)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(make_random_checkpoint(tempfile.mkdtemp(), "llada", **SHAPES[args.shape]))
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=gen).tolist()
    prompts = [torch.randint(0, 250, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block, threshold=args.threshold,
                            chunk_size=args.chunk, cache="dual")

    def run(tag: str) -> tuple[float, int, dict[str, list[int]]]:
        engine = Engine(model, EngineConfig(num_pages=8192, page_size=16))
        pending = list(enumerate(prompts))
        steps, texts = 0, {}
        start = time.perf_counter()
        while pending or engine.has_work():
            for _ in range(args.arrivals_per_step):
                if pending:
                    i, prompt = pending.pop(0)
                    engine.add(engine.make_request(f"{tag}-{i}", prompt, params))
            for out in engine.step():
                if out.finished:
                    texts[out.request_id.split("-", 1)[1]] = out.token_ids
            steps += 1
        return time.perf_counter() - start, steps, texts

    modes = {"one padded batch": False, "grouped by query count": True}
    times: dict[str, list[float]] = {m: [] for m in modes}
    outputs, num_steps = {}, {}
    for run_idx in range(args.repeats + 1):  # the first round warms up
        for name, grouped in modes.items():
            PagedAttention.group_by_query_count = grouped
            seconds, num_steps[name], outputs[name] = run(f"{run_idx}{grouped:d}")
            if run_idx:
                times[name].append(seconds)
    PagedAttention.group_by_query_count = True
    same = outputs["one padded batch"] == outputs["grouped by query count"]
    median = {m: statistics.median(ts) for m, ts in times.items()}
    result = {
        "benchmark": "bench_mixed_steps_cpu", "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "torch": torch.__version__, "settings": vars(args),
        "rows": [{"mode": m, "seconds": median[m], "seconds_all": times[m], "steps": num_steps[m],
                  "requests_per_s": args.requests / median[m]} for m in modes],
        "speedup": median["one padded batch"] / median["grouped by query count"],
        "same_tokens": same,
    }
    lines = [
        f"# Phase-mixed steps on CPU: one padded batch vs grouped attention ({result['date']}, {result['device']})", "",
        f"Random LLaDA-format model `{args.shape}`, float32; {args.requests} requests arriving "
        f"{args.arrivals_per_step} per step, prompts {args.min_prompt}-{args.max_prompt}, {args.max_tokens} generated, "
        f"block {args.block}, threshold {args.threshold}, chunks of {args.chunk}, dual cache; "
        f"median of {args.repeats} runs.", "",
        "| attention | seconds (median) | engine steps | requests/s |", "|---|---:|---:|---:|",
        *(f"| {r['mode']} | {r['seconds']:.3f} | {r['steps']} | {r['requests_per_s']:.1f} |" for r in result["rows"]),
        "", f"Grouping: **{result['speedup']:.1f}x** faster; same tokens in both modes: {'yes' if same else 'NO'}.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"mixed_steps_{args.shape}_cpu_{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
