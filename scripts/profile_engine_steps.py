"""Where a loaded engine's step time goes: host phases, GPU kernels, GPU idle (LLaDA-8B shape).

  python3 scripts/profile_engine_steps.py --out DIR [--concurrency 64] [--variants default,bf16-large]

The workload of ``bench_engine.py``'s end-to-end section (c requests added at once, prompt 256,
256 generated, block 32, fixed steps of 4 tokens, dual cache, random bf16 weights) on the
Triton path, run twice on one engine per variant; the second pass is timed. For each variant:

- tokens/s of the warm pass, its steps, and the wall time of each host phase of a step,
  summed over the pass: planning (``Engine.begin_step``), building the packed inputs
  (``ModelRunner._build``), launching the forward (``forward_inputs`` returns once its kernels
  are queued), waiting for the GPU and choosing commits (``_greedy_commits``: its ``tolist``
  waits for the step's kernels), and applying the step (``Engine.end_step``);
- for the first variant, the kernels of ``--profile-steps`` steps of the warm pass under the
  CUDA profiler: GPU time per kernel group, the busy share of the window (the union of kernel
  intervals over its wall time) and the largest kernels.

Variants: ``default`` (the committed engine), ``bf16-large`` (steps above 32 rows use bf16
products, ``matmul.UNROUNDED_MAX_ROWS = 32``), ``refresh-8192`` (``max_refresh_tokens`` 8192),
and the large-step matmul options of ``dilaserve/engine/gpu/matmul.py`` (``composed``: gate |
up through cuBLAS and silu_mul, the default before 2026-12-06; ``bf16-qkv``, ``swiglu``,
``swiglu-tma``, ``swiglu-tma-persistent``, ``swiglu-tma-8192``, ``swiglu-il`` (the default),
``swiglu-il-2048``, ``mm-add``, ``all``, ``one-row-silu``), and ``one-host-thread`` (the default
with torch's CPU ops on one thread: the step's input building is many small CPU ops).
Writes ``engine_steps_<device>_<date>.{json,md}`` under ``--out``. ``--tiny`` runs a toy model
(the torch path on a CPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as bench  # noqa: E402  (same folder: its model builders and the workload)
from profile_step import group  # noqa: E402

from dilaserve.engine.config import EngineConfig  # noqa: E402
from dilaserve.engine.engine import Engine  # noqa: E402
from dilaserve.engine.random_model import LLADA_8B, TINY, build_model  # noqa: E402
from dilaserve.engine.sampling_params import SamplingParams, default_cache  # noqa: E402
from dilaserve.models.packing import pack_projections  # noqa: E402
from dilaserve.models.paged_attention import PagedKVCache  # noqa: E402

# name -> (EngineConfig overrides, matmul.UNROUNDED_MAX_ROWS, matmul.VARIANTS entry)
VARIANTS = {
    "default": ({}, None, "default"),
    "bf16-large": ({}, 32, "default"),
    "refresh-8192": ({"max_refresh_tokens": 8192, "max_batch_tokens": 12288}, None, "default"),
    "composed": ({}, None, "composed"),
    "bf16-qkv": ({}, None, "bf16-qkv"),
    "swiglu": ({}, None, "swiglu"),
    "swiglu-tma": ({}, None, "swiglu-tma"),
    "swiglu-tma-persistent": ({}, None, "swiglu-tma-persistent"),
    "swiglu-tma-8192": ({}, None, "swiglu-tma-8192"),
    "swiglu-il": ({}, None, "swiglu-il"),
    "swiglu-il-2048": ({}, None, "swiglu-il-2048"),
    "mm-add": ({}, None, "mm-add"),
    "all": ({}, None, "all"),
    "one-row-silu": ({}, None, "one-row-silu"),
    "one-host-thread": ({}, None, "default"),  # torch's CPU ops (input building) on one thread
}
HOST_THREADS = {"one-host-thread": 1}
PHASES = ("plan", "build inputs", "launch forward", "wait + choose", "apply")


class PhaseClock:
    """Wall seconds spent inside wrapped methods, per phase label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0

        setattr(obj, name, timed)


def make_engine(model, path: str, num_pages: int, overrides: dict) -> Engine:
    kwargs = dict(num_pages=num_pages, page_size=16, max_running=256, max_batch_tokens=8192,
                  max_refresh_tokens=4096, kernels=path)
    kwargs.update(overrides)
    return Engine(model, EngineConfig(**kwargs))


def interval_union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def kernel_summary(prof, wall_s: float, steps: int, device_type=torch.autograd.DeviceType.CUDA) -> dict:
    """Kernel time per group and the GPU's busy share of the window (on a CPU, with
    ``device_type`` CPU: the profiled ops, nested ones counted twice; a check of the script)."""
    groups, counts, names, intervals = defaultdict(float), defaultdict(int), defaultdict(float), []
    for event in prof.events():
        if event.device_type != device_type:
            continue
        us = event.time_range.end - event.time_range.start
        groups[group(event.name)] += us / 1e3
        counts[group(event.name)] += 1
        names[event.name[:90]] += us / 1e3
        intervals.append((event.time_range.start, event.time_range.end))
    busy_ms = interval_union_us(intervals) / 1e3
    return {
        "steps": steps, "wall_ms": wall_s * 1e3, "busy_ms": busy_ms, "busy_share": busy_ms / (wall_s * 1e3),
        "groups": {g: {"ms_per_step": ms / steps, "kernels_per_step": counts[g] / steps} for g, ms in groups.items()},
        "top_kernels": [{"name": n, "ms_per_step": ms / steps}
                        for n, ms in sorted(names.items(), key=lambda kv: -kv[1])[:15]],
    }


def run_variant(model, name: str, args, num_pages: int, profile: bool) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(HOST_THREADS.get(name, threads))
    try:
        return _run_variant(model, name, args, num_pages, profile)
    finally:
        torch.set_num_threads(threads)


def _run_variant(model, name: str, args, num_pages: int, profile: bool) -> dict:
    from dilaserve.engine.gpu import matmul

    overrides, unrounded, options = VARIANTS[name]
    saved = matmul.UNROUNDED_MAX_ROWS, matmul.OPTIONS
    matmul.UNROUNDED_MAX_ROWS, matmul.OPTIONS = unrounded, matmul.VARIANTS[options]
    try:
        engine = make_engine(model, args.path, num_pages, overrides)
    finally:
        matmul.UNROUNDED_MAX_ROWS, matmul.OPTIONS = saved  # read when the engine was built
    spec, device = model.spec, model.lm_head_weight().device
    params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block,
                            steps=args.max_tokens // args.tokens_per_step, cache=default_cache(spec.causal_block_size))
    gen = torch.Generator().manual_seed(args.concurrency)
    prompts = [torch.randint(0, min(spec.mask_token_id, spec.eos_token_id), (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.concurrency)]

    def one_pass(tag: str, window: tuple[int, int] | None = None):
        for i, prompt in enumerate(prompts):
            engine.add(engine.make_request(f"{tag}{i}", prompt, params))
        bench.sync(device)
        t0 = time.perf_counter()
        steps, prof, window_s = 0, None, 0.0
        while engine.has_work():
            if window and prof is None and steps == window[0]:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                prof = profile(activities=activities)
                prof.__enter__()
                w0 = time.perf_counter()
            engine.step()
            steps += 1
            if prof is not None and not window_s and steps == window[1]:
                bench.sync(device)
                window_s = time.perf_counter() - w0
                prof.__exit__(None, None, None)
        bench.sync(device)
        return time.perf_counter() - t0, steps, prof, window_s

    cold_s = one_pass("cold")[0]
    clock = PhaseClock()
    clock.wrap(engine, "begin_step", "plan")
    clock.wrap(engine.runner, "_build", "build inputs")
    clock.wrap(engine.runner, "forward_inputs", "launch forward")
    clock.wrap(engine.runner, "_greedy_commits", "wait + choose")
    clock.wrap(engine, "end_step", "apply")
    finished_before = engine.num_finished
    seconds, steps, _, _ = one_pass("warm")
    finished = engine.num_finished - finished_before
    row = {
        "variant": name, "host_threads": torch.get_num_threads(), "overrides": overrides, "unrounded_max_rows": unrounded,
        "large_step_options": dataclasses.asdict(matmul.VARIANTS[options]), "concurrency": args.concurrency,
        "cold_seconds": cold_s, "seconds": seconds, "steps": steps, "finished": finished,
        "tokens_per_s": finished * args.max_tokens / seconds, "ms_per_step": seconds / steps * 1e3,
        "phases_ms_per_step": {p: clock.seconds[p] / steps * 1e3 for p in PHASES},
    }
    row["phases_ms_per_step"]["rest"] = row["ms_per_step"] - sum(row["phases_ms_per_step"].values())
    if profile and args.profile_steps > 0:  # --profile-steps 0: no profiled pass
        lo = min(args.profile_from, max(0, steps - args.profile_steps - 1))
        _, _, prof, window_s = one_pass("prof", window=(lo, lo + args.profile_steps))
        if prof is not None:
            kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
            row["kernels"] = kernel_summary(prof, window_s, args.profile_steps, kind)
            row["kernels"]["window"] = [lo, lo + args.profile_steps]
    return row


def markdown(result: dict) -> str:
    lines = [f"# Engine steps under load on {result['device']} ({result['date']})", "",
             f"{result['model_note']} {result['settings']['path']} path, c={result['settings']['concurrency']} requests added at once, "
             f"prompt {result['settings']['prompt_len']}, {result['settings']['max_tokens']} generated, block "
             f"{result['settings']['block']}, fixed steps ({result['settings']['tokens_per_step']} tokens/step), dual "
             "cache; second pass on one engine timed.", "",
             "| variant | s | tok/s | steps | ms/step | " + " | ".join(PHASES) + " | rest |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(PHASES) + 1)]
    for r in result["rows"]:
        ph = r["phases_ms_per_step"]
        lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['steps']} | "
                     f"{r['ms_per_step']:.1f} | " + " | ".join(f"{ph[p]:.1f}" for p in (*PHASES, "rest")) + " |")
    lines += ["", "Phases in ms per step (host wall time inside each; 'wait + choose' includes waiting for the "
              "step's kernels)."]
    for r in result["rows"]:
        k = r.get("kernels")
        if not k:
            continue
        lines += ["", f"## Kernels of {r['variant']}, steps {k['window'][0]}-{k['window'][1]} of the pass "
                  f"(profiled pass; {k['wall_ms'] / k['steps']:.1f} ms/step wall, GPU busy {k['busy_share']:.0%})",
                  "", "| group | ms / step | kernels / step |", "|---|---:|---:|"]
        for g, v in sorted(k["groups"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
            lines.append(f"| {g} | {v['ms_per_step']:.2f} | {v['kernels_per_step']:.0f} |")
        lines += ["", "| kernel | ms / step |", "|---|---:|"]
        lines += [f"| `{t['name']}` | {t['ms_per_step']:.2f} |" for t in k["top_kernels"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="engine-steps-out")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--variants", default="default,composed,bf16-qkv,all")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--profile-from", type=int, default=20, help="first profiled step of the pass")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--reserve-gib", type=float, default=18.0, help="GPU memory kept free of KV pages")
    parser.add_argument("--tiny", action="store_true", help="toy model (torch path on a CPU): check the script")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("profile_engine_steps.py needs a CUDA GPU (or --tiny)")
    args.path = "triton" if device.type == "cuda" else "torch"
    if args.tiny:
        args.prompt_len, args.max_tokens, args.block, args.profile_from, args.profile_steps = 16, 32, 8, 2, 2
    model = build_model(TINY if args.tiny else LLADA_8B, device)
    if device.type == "cuda":
        pack_projections(model)
    spec = model.spec
    context = args.prompt_len + args.max_tokens
    per_page = PagedKVCache.bytes_per_page(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                           next(model.parameters()).dtype)
    num_pages = args.concurrency * -(-context // 16) + 8
    if device.type == "cuda":  # within memory, as bench_engine.py sizes it (c=256 wants ~64 GiB of KV)
        free, _ = torch.cuda.mem_get_info(device)
        num_pages = min(num_pages, int((free - args.reserve_gib * 2**30) // per_page))
    result = {
        "benchmark": "profile_engine_steps", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items()}, "kv_gib": num_pages * per_page / 2**30,
        "model_note": ("LLaDA-8B shape, random bf16 weights (step cost does not depend on them)."
                       if not args.tiny else "Toy model (script check)."),
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in result["device"].lower()).strip("_")
    stem = out / f"engine_steps_{slug}_{result['date']}"
    for i, name in enumerate(variants):
        t0 = time.perf_counter()
        row = run_variant(model, name, args, num_pages, profile=(i == 0))
        gc.collect()  # the variant's engine and its KV pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["rows"].append(row)
        print(f"{name}: {row['seconds']:.2f} s, {row['tokens_per_s']:.0f} tok/s, {row['steps']} steps "
              f"({time.perf_counter() - t0:.0f} s with the cold pass)", flush=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
