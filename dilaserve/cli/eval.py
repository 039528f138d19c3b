"""``dilaserve eval``: accuracy and tokens decided per step of one decoding setting."""

from __future__ import annotations

import argparse
import json

from dilaserve.errors import InvalidRequestError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', an embedded model's name, or a directory")
    p.add_argument("--task", default="arith")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--num", type=int, default=200, help="problems to decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy and decoding speed of one setting on a checkable task")
    add_common(p)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=None, help="fixed-steps schedule instead of a threshold")
    p.add_argument("--chunk", type=int, default=None, help="positions queried per step (default: the block)")
    p.add_argument("--kv-retention", type=float, default=None,
                   help="head-centric sparse KV: share of out-of-block positions each head keeps (dual cache)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def load_engine(args: argparse.Namespace):
    import torch

    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from dilaserve.models.registry import load_model
    from dilaserve.models.store import resolve_model
    from dilaserve.models.tokenizer import load_tokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but no CUDA device is available")
    if args.num < 1:
        raise InvalidRequestError("--num must be >= 1")
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise InvalidRequestError(f"{model_dir} has no tokenizer.json: tasks need text")
    model = load_model(model_dir, device=args.device, dtype=getattr(torch, args.dtype))
    return Engine(model, EngineConfig(max_running=512, kv_memory_gib=2.0)), tokenizer


def run(args: argparse.Namespace) -> int:
    from dilaserve.eval.quality import evaluate

    engine, tokenizer = load_engine(args)
    point = evaluate(
        engine, tokenizer, task=args.task, split=args.split, num=args.num, seed=args.seed,
        max_tokens=args.max_tokens, block_size=args.block_size, threshold=args.threshold, steps=args.steps,
        chunk=args.chunk, cache=args.cache, kv_retention=args.kv_retention,
    )
    if args.json:
        print(json.dumps(point.to_dict()))
    else:
        lo, hi = point.accuracy_ci
        print(f"{args.task}/{args.split}: accuracy {point.accuracy:.1%} (95% CI {lo:.1%}-{hi:.1%}) over {point.num}; "
              f"{point.tokens_per_step:.2f} tokens decided per step, {point.mean_steps:.1f} steps per request"
              + (f" (sparse KV, retention {args.kv_retention})" if args.kv_retention is not None else ""))
    return 0
