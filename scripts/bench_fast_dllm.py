"""Fast-dLLM's published LLaDA generation, one request at a time, on this device: the baseline
of #8's "12x Fast-dLLM's dual-cache path on the same device".

Runs the generation functions of a checkout of Fast-dLLM (https://github.com/NVlabs/Fast-dLLM,
its ``llada/`` folder: ``generate.py`` and ``model/``) as published, on an LLaDA-8B-shaped model
with random bf16 weights (the config is LLaDA-8B-Instruct's; step cost does not depend on the
weights: fixed steps, so every run does the same forwards), at batch 1: prompt 256, 256
generated, block 32, 64 steps (4 tokens per step), no threshold. Reports seconds per request,
forwards (NFE) per request, ms per forward and decided tokens/s for each mode (``dual``: dual
cache, ``prefix``: prefix cache, ``none``: no cache), the median of ``--repeats`` runs after one
warm-up run. Nothing of Fast-dLLM is part of this project: point ``--fast-dllm`` at a checkout
(it needs ``transformers`` and ``einops``).

    python3 scripts/bench_fast_dllm.py --fast-dllm /path/to/Fast-dLLM/llada [--out DIR]
    python3 scripts/bench_fast_dllm.py --fast-dllm ... --tiny     # a toy shape on a CPU: check the script

Writes ``fast_dllm_<device>_<date>.{json,md}`` under ``--out`` when given; prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dilaserve.engine.random_model import LLADA_8B, TINY  # noqa: E402
from dilaserve.models.checkpoint import llada_config  # noqa: E402

MODES = {"dual": "generate_with_dual_cache", "prefix": "generate_with_prefix_cache", "none": "generate"}


def build(fast_dllm: Path, shape: dict, device: torch.device):
    """Fast-dLLM's LLaDAModelLM of ``shape`` with random weights, built on ``device`` directly (its
    own constructor builds on the CPU in float32 first: 32 GB and minutes at 8B)."""
    # This project's top-level ``kernels`` package shadows Hugging Face's ``kernels`` (which
    # transformers 5 imports) while the repository is on sys.path: leave it off for Fast-dLLM.
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    sys.path.insert(0, str(fast_dllm))
    from model.configuration_llada import LLaDAConfig
    from model.modeling_llada import LLaDAModel, LLaDAModelLM, create_model_config_from_pretrained_config

    config = LLaDAConfig(**llada_config(**shape))
    config.use_cache = False  # transformers 5 keeps it out of the config (its modeling code reads it)
    model_config = create_model_config_from_pretrained_config(config)
    model_config.init_device = "meta"
    lm = LLaDAModelLM(config, model=LLaDAModel(model_config, init_params=False))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = lm.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return lm.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast-dllm", required=True, type=Path, help="Fast-dLLM's llada/ folder (a checkout)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--modes", default="dual,prefix,none")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="forwards per request of the fixed schedule")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="toy shape (a CPU check of the script)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown modes {unknown}; choose from {sorted(MODES)}")
    if not (args.fast_dllm / "generate.py").is_file() or not (args.fast_dllm / "model").is_dir():
        parser.error(f"{args.fast_dllm} is not Fast-dLLM's llada/ folder (no generate.py and model/ there)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("bench_fast_dllm.py needs a CUDA GPU (or --tiny)")
    shape = TINY if args.tiny else LLADA_8B
    if args.tiny:
        args.prompt_len, args.gen_length, args.block, args.steps, args.repeats = 16, 32, 8, 8, 1
    model = build(args.fast_dllm, shape, device)
    import generate as fast_dllm_generate  # Fast-dLLM's generate.py (on sys.path from build)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"benchmark": "bench_fast_dllm", "date": datetime.date.today().isoformat(), "device": name,
              "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
              "model_note": "LLaDA-8B-Instruct's config, random weights" if not args.tiny else "toy shape",
              "rows": []}
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape["eos_token_id"] - 1, (1, args.prompt_len), generator=gen).to(device)
    for mode in modes:
        fn = getattr(fast_dllm_generate, MODES[mode])

        def run():
            with torch.no_grad():
                out = fn(model, prompt, steps=args.steps, gen_length=args.gen_length, block_length=args.block,
                         temperature=0.0, remasking="low_confidence", mask_id=shape["mask_token_id"], threshold=None)
            return out[1] if isinstance(out, tuple) else args.steps  # generate() returns x alone

        run()  # warm-up
        times, nfe = [], 0
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            nfe = run()
            sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        row = {"mode": mode, "function": MODES[mode], "seconds": seconds, "nfe": int(nfe),
               "ms_per_forward": seconds / int(nfe) * 1e3, "tokens_per_s": args.gen_length / seconds,
               "all_seconds": times}
        result["rows"].append(row)
        print(f"{mode}: {seconds:.2f} s, {row['nfe']} forwards, {row['ms_per_forward']:.1f} ms each, "
              f"{row['tokens_per_s']:.0f} tok/s", flush=True)
    lines = [f"# Fast-dLLM (published code) one request at a time on {name} ({result['date']})", "",
             f"{result['model_note']}; bf16 on a GPU. Prompt {args.prompt_len}, {args.gen_length} generated, block "
             f"{args.block}, {args.steps} forwards ({args.gen_length // args.steps} tokens each), no threshold; "
             f"median of {args.repeats} after a warm-up.", "",
             "| mode | function | s / request | forwards | ms / forward | tok/s |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | `{r['function']}` | {r['seconds']:.2f} | {r['nfe']} | {r['ms_per_forward']:.1f} | "
              f"{r['tokens_per_s']:.0f} |" for r in result["rows"]]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        stem = out / f"fast_dllm_{slug}_{result['date']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(table)
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
