"""``dilaserve profile``: the profiles the cost model, chunk controller and planner read.

- ``quality``: accuracy and tokens decided per step over thresholds and chunk sizes;
- ``latency``: step latency over batch sizes, chunk sizes, context lengths and phases, timed on
  the device at hand, with the fitted step cost and its error on held-out points;
- ``acceptance``: tokens decided per step for each chunk size and threshold (and the commit
  rate of each position of a chunk), measured on a trained model, for benchmarks whose model
  has random weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from dilaserve.cli.eval import add_common, load_engine

PROFILE_PAGE_SIZE = 16  # KV page size of the profiling runner

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure profiles the cost model and planner read")
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser("quality", help="accuracy and tokens decided per step over thresholds and chunk sizes")
    add_common(q)
    q.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")], default=list(DEFAULT_THRESHOLDS))
    q.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="chunk sizes (default: the block only)")
    q.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[],
                   help="fixed-steps settings to include, e.g. 64,32")
    q.add_argument("--kv-retentions", type=lambda s: [float(x) for x in s.split(",")], default=[],
                   help="sparse KV retentions to measure each threshold setting at too, e.g. 0.5 (dual cache); "
                        "the planner treats each as one more setting")
    q.add_argument("--out", default="profiles", help="directory for quality_<model>_<task>.json and .png")
    q.set_defaults(run=run_quality)

    lat = kinds.add_parser("latency", help="step latency over batch, chunk, context and phase; fits the cost model")
    lat.add_argument("--model", default="default", help="'default', an embedded model's name, or a directory")
    lat.add_argument("--shape", default=None, choices=["llada-8b", "tiny", "sdar-8b", "sdar-tiny"],
                     help="a random-weight model of this shape instead of --model (step cost does not depend on weights)")
    lat.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    lat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="auto: bfloat16 on CUDA, float32 on CPU")
    lat.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    lat.add_argument("--batch-sizes", type=_ints, default=None, help="default: 1,2,4,8 on CPU; 1,2,4,8,16,32,64 on CUDA")
    lat.add_argument("--chunks", type=_ints, default=None, help="default: 4,8,32 on CPU; 4,8,16,32 on CUDA")
    lat.add_argument("--contexts", type=_ints, default=None,
                     help="tokens per request; default: 64,128,256 on CPU; 256,512,1024 on CUDA")
    lat.add_argument("--phases", default="refresh,reuse,mixed")
    lat.add_argument("--block-size", type=int, default=32)
    lat.add_argument("--max-step-tokens", type=int, default=16384, help="skip points computing more per step")
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--test-fraction", type=float, default=0.25, help="share of points held out of the fit")
    lat.add_argument("--seed", type=int, default=0)
    lat.add_argument("--kv-memory-gib", type=float, default=None,
                     help="KV memory an instance would hold, for the planner entry (default: free memory on CUDA, 1 GiB on CPU)")
    lat.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    lat.add_argument("--kv-retention", type=float, default=None,
                     help="time head-centric sparse KV at this retention (reuse steps read the kept share)")
    lat.add_argument("--tensor-parallel", type=_ints, default=[1],
                     help="degrees to profile, e.g. 1,2 (one GPU a rank); the planner file holds them all")
    lat.add_argument("--out", default="profiles", help="directory for latency_<model>_<device>.json and .png")
    lat.set_defaults(run=run_latency)

    acc = kinds.add_parser("acceptance", help="tokens decided per step for each chunk size and threshold")
    add_common(acc)
    acc.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.7, 0.8, 0.9, 0.95])
    acc.add_argument("--chunks", type=_ints, default=[1, 2, 4, 8, 16, 32])
    acc.add_argument("--out", default=None,
                     help="directory for acceptance_<model>.json (default: the planner's default profiles)")
    acc.set_defaults(run=run_acceptance)


def _ints(text: str) -> list[int]:
    """Comma-separated positive integers (batch sizes, chunks, contexts, degrees)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def run_quality(args: argparse.Namespace) -> int:
    from dilaserve.eval.quality import evaluate

    engine, tokenizer = load_engine(args)
    chunks = args.chunks or [args.block_size]
    retentions = [None, *args.kv_retentions]
    settings = [dict(threshold=t, chunk=c, kv_retention=r) for r in retentions for c in chunks for t in args.thresholds]
    settings += [dict(threshold=None, steps=s, chunk=None) for s in args.steps]
    entries = []
    for s in settings:
        point = evaluate(
            engine, tokenizer, task=args.task, split=args.split, num=args.num, seed=args.seed,
            max_tokens=args.max_tokens, block_size=args.block_size, cache=args.cache, **s,
        )
        entries.append(point.to_dict())
        setting = f"steps={point.steps}" if point.steps else f"threshold={point.threshold} chunk={point.chunk}"
        if point.kv_retention is not None:
            setting += f" kv={point.kv_retention:g}"
        print(f"{setting:28} accuracy {point.accuracy:6.1%}  tokens/step {point.tokens_per_step:5.2f}", flush=True)
    from dilaserve.models.store import resolve_model

    model_name = resolve_model(args.model).name
    profile = {
        "model": model_name, "task": args.task, "split": args.split, "block_size": args.block_size,
        "max_tokens": args.max_tokens, "cache": args.cache, "device": args.device, "dtype": args.dtype,
        "date": datetime.date.today().isoformat(), "entries": entries,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality_{model_name}_{args.task}"
    (out / f"{stem}.json").write_text(json.dumps(profile, indent=2))
    plot_quality(profile, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


def plot_quality(profile: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    curves = sorted({(e["chunk"], e.get("kv_retention") or 0.0)
                     for e in profile["entries"] if e["threshold"] is not None})
    for chunk, retention in curves:
        rows = sorted((e for e in profile["entries"] if e["threshold"] is not None and e["chunk"] == chunk
                       and (e.get("kv_retention") or 0.0) == retention), key=lambda e: e["threshold"])
        label = f"chunk {chunk}" + (f", sparse KV {retention:g}" if retention else "")
        xs = [e["threshold"] for e in rows]
        ax_acc.errorbar(xs, [100 * e["accuracy"] for e in rows],
                        yerr=[[100 * (e["accuracy"] - e["accuracy_ci"][0]) for e in rows],
                              [100 * (e["accuracy_ci"][1] - e["accuracy"]) for e in rows]],
                        marker="o", capsize=3, label=label)
        ax_speed.plot(xs, [e["tokens_per_step"] for e in rows], marker="o", label=label)
    for e in profile["entries"]:
        if e["steps"]:
            ax_acc.axhline(100 * e["accuracy"], ls="--", lw=1, color="gray")
            ax_acc.annotate(f"fixed {e['steps']} steps", (min(e2["threshold"] or 1 for e2 in profile["entries"]),
                            100 * e["accuracy"]), fontsize=8, color="gray")
    ax_acc.set(xlabel="confidence threshold", ylabel="accuracy (%)", title=f"{profile['model']} on {profile['task']}")
    ax_speed.set(xlabel="confidence threshold", ylabel="tokens decided per step",
                 title=f"block {profile['block_size']}, {profile['cache']} cache")
    for ax in (ax_acc, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- latency ------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text.lower()).strip("_")


def run_latency(args: argparse.Namespace) -> int:
    import torch

    from dilaserve.engine.latency_profile import save_profile
    from dilaserve.engine.profiling import Grid
    from dilaserve.errors import InvalidRequestError

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but no CUDA device is available")
    on_gpu = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.tensor_parallel import ModelSource, TensorParallelGroup

    dtype_name = str(dtype).removeprefix("torch.")
    if args.shape:
        source, model_name = ModelSource(random_shape=args.shape, dtype=dtype_name, device=device.type), \
            f"{args.shape}-random"
    else:
        from dilaserve.models.store import resolve_model

        model_dir = resolve_model(args.model)
        source, model_name = ModelSource(model_dir=str(model_dir), dtype=dtype_name, device=device.type), model_dir.name
    grid = Grid(
        batch_sizes=tuple(args.batch_sizes or ((1, 2, 4, 8, 16, 32, 64) if on_gpu else (1, 2, 4, 8))),
        chunks=tuple(args.chunks or ((4, 8, 16, 32) if on_gpu else (4, 8, 32))),
        contexts=tuple(args.contexts or ((256, 512, 1024) if on_gpu else (64, 128, 256))),
        phases=tuple(p for p in args.phases.split(",") if p), block_size=args.block_size,
        max_step_tokens=args.max_step_tokens, warmup=args.warmup, repeats=args.repeats,
        kv_retention=args.kv_retention,
    )
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    out = Path(args.out)
    sparse = f"_kv{args.kv_retention:g}" if args.kv_retention is not None else ""
    stem = f"latency_{_slug(model_name)}_{_slug(device_name)}{sparse}"
    profiles = []
    for degree in args.tensor_parallel:
        tp = TensorParallelGroup(degree, source, EngineConfig(kernels=args.kernels)) if degree > 1 else None
        try:
            model = source.load_shard(0, degree, tp.device if tp else device, tp.all_reduce if tp else None)
            profile = _profile_degree(args, model, model_name, device_name, dtype, grid, degree, tp)
        finally:
            if tp is not None:
                tp.close()
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        name = stem if len(args.tensor_parallel) == 1 else f"{stem}_tp{degree}"
        save_profile(profile, out / f"{name}.json")
        plot_latency(profile, out / f"{name}.png")
        print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
        profiles.append(profile)
    if len(profiles) > 1:  # the planner's file: every degree's entry
        merged = {**profiles[0], "degrees": [d for p in profiles for d in p["degrees"]]}
        save_profile(merged, out / f"{stem}.json")
        print(f"wrote {out / (stem + '.json')} (degrees {', '.join(str(d) for d in args.tensor_parallel)})")
    return 0


def _profile_degree(args, model, model_name: str, device_name: str, dtype, grid, degree: int, tp) -> dict:
    import torch

    from dilaserve.engine.latency_profile import profile_dict
    from dilaserve.engine.profiling import kv_does_not_fit, measure_grid
    from dilaserve.engine.sampling_params import default_cache
    from dilaserve.errors import DiLaServeError
    from dilaserve.models.paged_attention import PagedKVCache
    from dilaserve.models.tensor_parallel import local_kv_heads

    todo = len(grid.points())
    print(f"profiling {model_name} on {device_name} x{degree} ({str(dtype).removeprefix('torch.')}): "
          f"{todo} grid points", flush=True)
    done = [0]

    def progress(point) -> None:
        done[0] += 1
        print(f"[{done[0]:4d}/{todo}] {point.phase:7} batch {point.batch_size:3d} chunk {point.chunk:3d} "
              f"context {point.context:5d} tokens {point.shape.tokens:6d}: {point.seconds * 1e3:9.2f} ms", flush=True)

    spec = model.spec
    device = next(model.parameters()).device
    if device.type == "cuda":  # say so, rather than a CUDA out-of-memory error mid-way
        page = PagedKVCache.bytes_per_page(spec.num_layers, PROFILE_PAGE_SIZE, local_kv_heads(spec, degree),
                                           spec.head_dim, dtype)
        problem = kv_does_not_fit(grid, PROFILE_PAGE_SIZE, page, torch.cuda.mem_get_info(device)[0])
        if problem:
            raise DiLaServeError(problem)
    points = measure_grid(model, grid, page_size=PROFILE_PAGE_SIZE, kernels=args.kernels, progress=progress, tp=tp)
    # KV bytes per token on one rank (it caches its share of the heads); capacity is per instance.
    per_token = PagedKVCache.bytes_per_page(spec.num_layers, 1, local_kv_heads(spec, degree), spec.head_dim, dtype)
    if args.kv_memory_gib is not None:
        kv_bytes = args.kv_memory_gib * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        kv_bytes = max(free - 8 * 2**30, per_token)  # what is left beside weights, less room for activations
    else:
        kv_bytes = 2**30
    meta = {"model": model_name, "device": device_name, "dtype": str(dtype).removeprefix("torch."),
            "kernels": args.kernels, "cache": default_cache(spec.causal_block_size),
            "block_size": args.block_size, "tensor_parallel": degree,
            "kv_retention": args.kv_retention,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "grid": {"batch_sizes": list(grid.batch_sizes), "chunks": list(grid.chunks),
                     "contexts": list(grid.contexts), "phases": list(grid.phases),
                     "warmup": grid.warmup, "repeats": grid.repeats}}
    profile = profile_dict(points, meta, kv_capacity_tokens=int(kv_bytes // per_token),
                           test_fraction=args.test_fraction, seed=args.seed, degree=degree)
    h, h3 = profile["holdout"], profile["holdout_3term"]
    fit = profile["fit"]
    print("fitted step cost: " + ", ".join(f"{k} {v:.3g}" for k, v in fit.items()))
    print(f"held-out relative error ({h['num_test']} of {h['num_test'] + h['num_train']} points): "
          f"median {h['median_rel_error']:.1%}, max {h['max_rel_error']:.1%} "
          f"(three-term form: median {h3['median_rel_error']:.1%}, max {h3['max_rel_error']:.1%})")
    return profile


def plot_latency(profile: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dilaserve.engine.cost_model import StepCost
    from dilaserve.engine.latency_profile import LatencyPoint, holdout_split

    cost = StepCost(**profile["fit"])
    points = [LatencyPoint.from_dict(row) for row in profile["points"]]
    _, test = holdout_split(points, profile["holdout"]["test_fraction"], profile["holdout"]["seed"])
    held = {id(p) for p in test}
    fig, (ax_fit, ax_tok) = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"refresh": "s", "reuse": "o", "mixed": "^"}
    for phase, marker in markers.items():
        rows = [p for p in points if p.phase == phase]
        if not rows:
            continue
        ax_tok.scatter([p.shape.tokens for p in rows], [p.seconds * 1e3 for p in rows], marker=marker, s=18,
                       label=phase, alpha=0.8)
        for is_test in (False, True):
            sel = [p for p in rows if (id(p) in held) == is_test]
            if sel:
                ax_fit.scatter([p.seconds * 1e3 for p in sel], [cost.shape_s(p.shape) * 1e3 for p in sel],
                               marker=marker, s=24 if is_test else 14, facecolors="none" if is_test else None,
                               edgecolors="C3" if is_test else None, label=f"{phase}{' (held out)' if is_test else ''}")
    lims = [min(p.seconds for p in points) * 1e3 * 0.8, max(p.seconds for p in points) * 1e3 * 1.2]
    ax_fit.plot(lims, lims, color="gray", lw=1)
    h = profile["holdout"]
    ax_fit.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="cost model (ms)",
               title=f"held-out error: median {h['median_rel_error']:.1%}, max {h['max_rel_error']:.1%}")
    ax_tok.set(xscale="log", yscale="log", xlabel="token-forwards in the step", ylabel="step (ms)",
               title=f"{profile['model']} on {profile['device']}")
    for ax in (ax_fit, ax_tok):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- acceptance ---------------------------------------------------------------------------------
def run_acceptance(args: argparse.Namespace) -> int:
    from dilaserve.engine.acceptance_profile import measure_acceptance
    from dilaserve.models.store import resolve_model

    engine, tokenizer = load_engine(args)
    model_name = resolve_model(args.model).name
    profile = measure_acceptance(
        engine, tokenizer, task=args.task, split=args.split, num=args.num, seed=args.seed, max_tokens=args.max_tokens,
        block_size=args.block_size, thresholds=args.thresholds, chunks=args.chunks, cache=args.cache,
        progress=lambda line: print(line, flush=True))
    profile.update(model=model_name, device=args.device, dtype=args.dtype, date=datetime.date.today().isoformat())
    if args.out is None:  # imported here: the planner needs PuLP, which latency profiling does not
        from dilaserve.planner.profiles import DEFAULT_PROFILES_DIR

        args.out = str(DEFAULT_PROFILES_DIR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"acceptance_{model_name}.json"
    path.write_text(json.dumps(profile, indent=1))
    print(f"wrote {path}")
    return 0
