"""``dilaserve generate``: decode prompts with the reference generator."""

from __future__ import annotations

import argparse
import json
import sys

from dilaserve.errors import InvalidRequestError


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="decode prompts with the reference generator (one at a time)")
    p.add_argument("--model", required=True, help="model directory in its published Hugging Face format")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; chat template applied)")
    p.add_argument("--prompt-ids", action="append", type=_ids, default=[], help="prompt token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    p.add_argument("--gen-length", type=int, default=128, help="generated positions (tokens)")
    p.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block size (tokens)")
    p.add_argument("--steps", type=int, default=None, help="forwards in total (fixed-steps schedule)")
    p.add_argument("--threshold", type=float, default=None, help="confidence threshold (Fast-dLLM parallel decoding)")
    p.add_argument("--algorithm", default="llada", help="llada, or a Dream algorithm: origin, maskgit_plus, topk_margin, entropy")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    p.add_argument("--refresh-interval", type=int, default=0, help="refresh the cache on every N-th step of a block (1: every step; 0, the default: only at its start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="one JSON object per request and line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dilaserve.generation.reference import GenerationConfig, generate
    from dilaserve.models.registry import load_model
    from dilaserve.models.tokenizer import load_tokenizer

    if not args.prompt and not args.prompt_ids:
        raise InvalidRequestError("give at least one --prompt or --prompt-ids")
    if args.steps is None and args.threshold is None:
        args.steps = args.gen_length // args.block_length * args.block_length  # one token per step
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but no CUDA device is available")
    config = GenerationConfig(
        gen_length=args.gen_length, block_length=args.block_length, steps=args.steps, threshold=args.threshold,
        algorithm=args.algorithm, remasking=args.remasking, temperature=args.temperature, cache=args.cache,
        refresh_interval=args.refresh_interval, seed=args.seed,
    )
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(args.model)
    prompts: list[list[int]] = []
    for text in args.prompt:
        if tokenizer is None:
            raise InvalidRequestError(f"{args.model} has no tokenizer.json: use --prompt-ids")
        if not args.raw and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    prompts.extend(args.prompt_ids)
    # Validate every request before decoding any, so bad input fails fast.
    for ids in prompts:
        config.validate(len(ids), model.spec.vocab_size, model.spec.max_positions)
        bad = [t for t in ids if not 0 <= t < model.spec.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {model.spec.vocab_size})")
    for ids in prompts:
        result = generate(model, ids, config)
        record = {"prompt_ids": ids, "canvas_ids": result.canvas_ids, "token_ids": result.token_ids, "nfe": result.nfe}
        if tokenizer is not None:
            record["text"] = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(record.get("text", record["token_ids"]), file=sys.stdout, flush=True)
    return 0
