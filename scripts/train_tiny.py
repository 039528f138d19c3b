#!/usr/bin/env python3
"""Train the embedded model: a small LLaDA-architecture masked-diffusion LM on a checkable task.

    python scripts/train_tiny.py --task arith --device cuda --out runs/tiny --max-minutes 8

Writes into ``--out`` the model in LLaDA's published format (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json), plus training_log.json and loss_curve.png. Training
state (weights, optimizer, noise RNG, step, elapsed time) goes to ``--state`` every
``--ckpt-every`` steps and at the end; ``--resume`` continues from it (batch ``k`` is a pure
function of seed and ``k``, so data needs no state). ``--init-from DIR`` starts a new stage
from a saved model (fresh optimizer and schedule). The learning rate follows warmup then
cosine decay over ``max(step / steps, elapsed / max_minutes)``, so a run cut short by its
wall-clock budget still anneals; without ``--max-minutes`` a run is exactly reproducible
from its seed. At the end the saved weights are evaluated on the task's test split with
threshold decoding (block 32) at several thresholds.

The shipped model (dilaserve/assets/models/dilaserve-tiny-arith) was trained on one H100
in two stages of about 8.5 minutes each:

    python scripts/train_tiny.py --out runs/stage1 --device cuda --workers 12 --d-model 256 \
        --layers 6 --heads 4 --mlp 640 --steps 100000 --max-minutes 8.4 --batch-size 1024 \
        --lr 1.5e-3 --warmup 200 --eval-every 500 --eval-padded-tokens 512
    python scripts/train_tiny.py --out runs/stage2 --init-from runs/stage1 --seed 1 --device cuda \
        --workers 12 --steps 100000 --max-minutes 8.5 --batch-size 1024 --lr 6e-4 --warmup 100 \
        --eval-every 1000 --eval-padded-tokens 512
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from dilaserve.models.checkpoint import llada_config, save_checkpoint
from dilaserve.models.registry import FAMILIES, build_model, load_model, read_config, read_spec
from dilaserve.models.tokenizer import save_tokenizer
from dilaserve.tasks import get_task
from dilaserve.tasks.evaluate import evaluate
from dilaserve.tasks.tokens import ChatEncoder, build_task_tokenizer
from dilaserve.tasks.train import TrainStream, masked_diffusion_loss, pack_batch

logger = logging.getLogger("train_tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="arith")
    p.add_argument("--out", required=True, help="directory for the model, tokenizer, log and plot")
    p.add_argument("--state", default=None, help="training-state file (default: OUT/train_state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--init-from", default=None,
                   help="start from the weights, config and tokenizer of a saved model directory (fresh optimizer)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=768, help="SwiGLU hidden width")
    p.add_argument("--max-len", type=int, default=1024, help="max_sequence_length written to config.json")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock training budget (0 = none)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--response-lengths", default="64,128",
                   help="response lengths (tokens, EOS padding included); each batch draws one")
    p.add_argument("--fewshot-prob", type=float, default=0.1,
                   help="share of batches whose prompts carry a few-shot preamble")
    p.add_argument("--fewshot-max", type=int, default=6, help="most solved examples in a preamble")
    p.add_argument("--num-merges", type=int, default=600, help="BPE merges learned on the task corpus (0 = bytes)")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0 = never)")
    p.add_argument("--eval-num", type=int, default=200, help="test problems evaluated at the end (0 = skip)")
    p.add_argument("--eval-thresholds", default="0.9,0.7,0.5,0.3")
    p.add_argument("--eval-padded-tokens", type=int, default=0,
                   help="also evaluate 100 test prompts padded with few-shot examples to this many tokens")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-at", type=int, default=0, help="stop at this step as if interrupted (tests resuming)")
    return p.parse_args(argv)


class BatchSource(torch.utils.data.IterableDataset):
    """Packed CPU batches for steps [start, stop); worker w of n builds steps start + w, start + w + n, ...

    The DataLoader takes from its workers in turn, so batches arrive in step order.
    """

    def __init__(self, stream: TrainStream, encoder: ChatEncoder, batch_size: int, start: int, stop: int):
        self.stream, self.encoder, self.batch_size, self.start, self.stop = stream, encoder, batch_size, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.stop, num_workers):
            yield pack_batch(self.encoder, *self.stream.batch(step, self.batch_size))


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def init_weights_(model: torch.nn.Module, num_layers: int, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("attn_out.weight", "ff_out.weight")) \
                and ".blocks." in name else 0.02
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_tokenizer(args, task, out: Path):
    from tokenizers import Tokenizer

    if args.init_from:
        return Tokenizer.from_file(str(Path(args.init_from) / "tokenizer.json"))
    if args.resume and (out / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(out / "tokenizer.json"))
    corpus = [f"{e.prompt}\n{e.solution}" for e in task.examples("train", 2000, seed=args.seed)]
    return build_task_tokenizer(corpus, args.num_merges)


def save_loss_curve(history: list[tuple[int, float]], path: Path, restart_step: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, losses = zip(*history) if history else ((), ())
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss (1/t weighted)")
    ax.set_yscale("log")
    if restart_step:
        ax.axvline(restart_step, color="grey", ls="--", lw=1, label="continued with --init-from")
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.workers:
        # Workers fork after the tokenizer has run; each then tokenises on one thread.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = Path(args.state) if args.state else out / "train_state.pt"
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    task = get_task(args.task)
    tok = make_tokenizer(args, task, out)
    special = save_tokenizer(tok, out)
    encoder = ChatEncoder(tok)
    vocab_size = -(-tok.get_vocab_size() // 64) * 64
    if args.init_from:
        # Continue from a saved model: its config and weights, not the size flags.
        config = read_config(args.init_from)
        spec = read_spec(args.init_from)
        model = load_model(args.init_from)
    else:
        config = llada_config(
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, mlp_hidden_size=args.mlp,
            vocab_size=vocab_size, mask_token_id=special["<|mdm_mask|>"], eos_token_id=special["<|endoftext|>"],
            max_sequence_length=args.max_len,
        )
        spec = FAMILIES["llada"].read_spec(config, "train_tiny config")
        model = build_model(spec)
        init_weights_(model, args.layers, args.seed)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    response_lengths = [int(x) for x in args.response_lengths.split(",")]
    stream = TrainStream(task, args.seed, args.fewshot_prob, args.fewshot_max, response_lengths)
    noise = torch.Generator(device=device).manual_seed(args.seed)
    step, elapsed, history, val_history = 0, 0.0, [], []
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        noise.set_state(state["noise"].cpu())
        step, elapsed, history, val_history = state["step"], state["elapsed"], state["history"], state["val_history"]
        logger.info("resumed from %s at step %d (%.1f s trained)", state_path, step, elapsed)

    def save_state() -> None:
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "noise": noise.get_state(),
            "step": step, "elapsed": elapsed,
            "history": history, "val_history": val_history, "args": vars(args),
        }, state_path)

    num_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, vocab %d, device %s", num_params / 1e6, vocab_size, device)
    budget_s = args.max_minutes * 60
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True)
    running = None
    pending: list[torch.Tensor] = []
    batches = iter(torch.utils.data.DataLoader(
        BatchSource(stream, encoder, args.batch_size, step, args.steps), batch_size=None,
        num_workers=args.workers, prefetch_factor=4 if args.workers else None, persistent_workers=False,
    ))
    while step < args.steps:
        progress = max(step / args.steps, elapsed / budget_s if budget_s else 0.0)
        if progress >= 1.0:
            break
        started = time.perf_counter()
        lr = args.lr * lr_factor(progress, step, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches).to(device)
        with autocast:
            loss = masked_diffusion_loss(model, batch, encoder.mask_id, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = torch.stack(pending).mean().item()
            pending.clear()
            history.append((step, mean))
            running = mean
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            if args.no_progress:
                logger.info("step %d: loss %.4f, lr %.2e, %.0f s", step, mean, lr, elapsed)
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            result = evaluate(model, encoder, task, task.examples("validation", 100, seed=args.seed),
                              threshold=0.9, gen_length=args.gen_length, block_size=args.block_size)
            model.train()
            val_history.append((step, result.accuracy))
            logger.info("step %d: validation accuracy %.3f at threshold 0.9", step, result.accuracy)
        if device.type == "cuda" and step % args.log_every == 0:
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - started
        bar.update(1)
        if step % args.ckpt_every == 0:
            save_state()
        if step == args.stop_at:
            break
    bar.close()
    if pending:
        history.append((step, torch.stack(pending).mean().item()))
    save_state()
    if step == args.stop_at:
        return {"steps": step, "interrupted": True}

    model.eval()
    save_dtype = getattr(torch, args.save_dtype)
    shipped = build_model(spec)
    shipped.load_state_dict({k: v.detach().to("cpu", save_dtype) for k, v in model.state_dict().items()}, assign=True)
    save_checkpoint(shipped, config, out)
    earlier = {}
    if args.init_from and (Path(args.init_from) / "training_log.json").is_file():
        earlier = json.loads((Path(args.init_from) / "training_log.json").read_text())
    offset = earlier.get("total_steps", earlier.get("steps", 0))
    save_loss_curve(earlier.get("full_loss_history", earlier.get("loss_history", []))
                    + [(offset + s, loss) for s, loss in history], out / "loss_curve.png", restart_step=offset)

    # Measure what ships: the saved (possibly bfloat16) weights, loaded back as float32.
    shipped = load_model(out, device=device)
    results, padded_results = [], []
    if args.eval_num:
        examples = task.examples("test", args.eval_num, seed=0)
        for threshold in (float(x) for x in args.eval_thresholds.split(",")):
            r = evaluate(shipped, encoder, task, examples, threshold=threshold, gen_length=args.gen_length,
                         block_size=args.block_size)
            results.append(vars(r))
            logger.info("test threshold %.2f: accuracy %.3f, %.2f tokens/step, %.1f steps/problem",
                        threshold, r.accuracy, r.tokens_per_step, r.mean_steps)
        if args.eval_padded_tokens:
            count = lambda text: len(encoder.prompt_ids([text])[0])  # noqa: E731
            padded = [replace(e, prompt=task.pad_prompt(e, args.eval_padded_tokens, count, seed=i))
                      for i, e in enumerate(examples[:100])]
            r = evaluate(shipped, encoder, task, padded, threshold=0.9, gen_length=args.gen_length,
                         block_size=args.block_size, batch_size=64)
            padded_results.append({"prompt_tokens": args.eval_padded_tokens, **vars(r)})
            logger.info("test, prompts padded to %d tokens, threshold 0.90: accuracy %.3f",
                        args.eval_padded_tokens, r.accuracy)
    log = {
        "task": args.task, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "num_params": num_params, "steps": step, "train_seconds": round(elapsed, 1),
        "final_loss": running, "args": vars(args), "loss_history": history,
        "total_steps": offset + step,
        "full_loss_history": earlier.get("full_loss_history", earlier.get("loss_history", []))
        + [(offset + s, loss) for s, loss in history],
        "init_from_log": {k: v for k, v in earlier.items() if k not in ("loss_history", "full_loss_history")},
        "validation_accuracy": val_history,
        "test_eval": {"split": "test", "seed": 0, "gen_length": args.gen_length, "block_size": args.block_size,
                      "decoding": "threshold, semi-autoregressive, no cache", "results": results,
                      "padded_prompt_results": padded_results},
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main(sys.argv[1:])
