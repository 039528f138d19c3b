"""``dilaserve profile quality``: the quality profile the planner reads, with a plot."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from dilaserve.cli.eval import add_common, load_engine

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
    q.add_argument("--out", default="profiles", help="directory for quality_<model>_<task>.json and .png")
    q.set_defaults(run=run_quality)


def run_quality(args: argparse.Namespace) -> int:
    from dilaserve.eval.quality import evaluate

    engine, tokenizer = load_engine(args)
    chunks = args.chunks or [args.block_size]
    settings = [dict(threshold=t, chunk=c) for c in chunks for t in args.thresholds]
    settings += [dict(threshold=None, steps=s, chunk=None) for s in args.steps]
    entries = []
    for s in settings:
        point = evaluate(
            engine, tokenizer, task=args.task, split=args.split, num=args.num, seed=args.seed,
            max_tokens=args.max_tokens, block_size=args.block_size, cache=args.cache, **s,
        )
        entries.append(point.to_dict())
        setting = f"steps={point.steps}" if point.steps else f"threshold={point.threshold} chunk={point.chunk}"
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
    chunks = sorted({e["chunk"] for e in profile["entries"] if e["threshold"] is not None})
    for chunk in chunks:
        rows = sorted((e for e in profile["entries"] if e["threshold"] is not None and e["chunk"] == chunk),
                      key=lambda e: e["threshold"])
        xs = [e["threshold"] for e in rows]
        ax_acc.errorbar(xs, [100 * e["accuracy"] for e in rows],
                        yerr=[[100 * (e["accuracy"] - e["accuracy_ci"][0]) for e in rows],
                              [100 * (e["accuracy_ci"][1] - e["accuracy"]) for e in rows]],
                        marker="o", capsize=3, label=f"chunk {chunk}")
        ax_speed.plot(xs, [e["tokens_per_step"] for e in rows], marker="o", label=f"chunk {chunk}")
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
