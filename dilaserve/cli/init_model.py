"""``dilaserve init-model``: write a random model in a published format (tests, benchmarks)."""

from __future__ import annotations

import argparse

# Named shapes: "tiny" for CPU tests and demos; "llada-8b" is LLaDA-8B's shape for GPU cost work.
SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=320, max_positions=1024),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=768, vocab_size=320, max_positions=2048),
    "llada-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=12288, vocab_size=126464, max_positions=4096),
}


def add_parser(sub) -> None:
    p = sub.add_parser("init-model", help="write a random model in its published format")
    p.add_argument("out", help="output directory")
    p.add_argument("--family", default="llada", choices=["llada", "dream"])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dilaserve.models.checkpoint import make_random_checkpoint

    path = make_random_checkpoint(args.out, args.family, seed=args.seed, **SHAPES[args.shape])
    print(f"wrote a random {args.family} model ({args.shape}) to {path}")
    return 0
