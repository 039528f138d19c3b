"""Block diffusion on the GPU: an SDAR-8B-shaped model (block-causal, exact KV cache) through the engine.

Random bf16 weights of SDAR-8B-Chat's shape (Qwen3-8B: d 4096, 36 layers, 32 query / 8 KV heads
of 128, MLP 12288, vocab 151936; 4-token blocks), built on the GPU. Step cost does not depend on
the weights: a fixed-steps schedule (``--tokens-per-step`` per step) commits the same positions
whatever the logits say, and the end-of-sequence row is zeroed so no request stops early.
c requests (prompt ``--prompt-len``, ``--max-tokens`` generated) are added at once and decoded
to the end through ``Engine`` on the Triton path (block-causal paged attention, fused element-
wise kernels, fused logit budget), then the same on the pure-torch path. Reported: seconds,
ms per engine step, requests/s, tokens/s, token-forwards/s and their share of the compute bound.

    python3 scripts/bench_block_diffusion.py --out DIR [--concurrency 1,8,64]

``--tiny`` checks the script on a toy model (CPU works).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine  # noqa: E402  (the engine benchmark's end-to-end section and ceilings)

from dilaserve.engine.random_model import SDAR_8B, SDAR_TINY, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--paths", default="triton,torch")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tokens-per-step", type=int, default=2)
    parser.add_argument("--num-pages", type=int, default=None, help="KV pages (default: fit c=max requests)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("bench_block_diffusion.py measures a GPU; use --tiny to check the script on CPU")
    shape = SDAR_TINY if args.tiny else SDAR_8B
    model = build_model(shape, device)
    spec = model.spec
    args.block = spec.causal_block_size
    levels = [int(c) for c in args.concurrency.split(",")]
    num_pages = args.num_pages or max(levels) * (-(-(args.prompt_len + args.max_tokens) // 16)) + 8
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ceilings = bench_engine.device_ceilings(device, args.tiny)
    result = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "shape": "sdar-tiny" if args.tiny else "sdar-8b", "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
              "block": args.block, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "tokens_per_step": args.tokens_per_step, "ceilings": ceilings, "runs": []}
    floor_ms = bench_engine.weight_bytes_read(spec, args.prompt_len + args.max_tokens) / (ceilings["copy_tb_per_s"] * 1e12) * 1e3
    result["batch1_floor_ms"] = floor_ms
    start = time.time()
    for path in args.paths.split(","):  # warm-up: Triton compiles its kernels for these shapes
        warm = argparse.Namespace(**{**vars(args), "max_tokens": 4 * args.block, "prompt_len": 32})
        bench_engine.end_to_end(model, path, 2, warm, num_pages, ceilings["matmul_tflops"])
    for path in args.paths.split(","):
        for c in levels:
            run = bench_engine.end_to_end(model, path, c, args, num_pages, ceilings["matmul_tflops"])
            result["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("path", "concurrency", "seconds", "ms_per_step", "tokens_per_s",
                                                   "share_of_bound")}), flush=True)
    result["wall_s"] = time.time() - start
    lines = [f"# Block diffusion (SDAR-8B shape, block-causal, exact cache) on {name} ({result['date']})", "",
             f"`scripts/bench_block_diffusion.py`: random bf16 weights ({result['params_b']:.2f}B params), prompt "
             f"{args.prompt_len}, {args.max_tokens} generated, block {args.block}, fixed steps "
             f"({args.tokens_per_step} tokens/step), c requests at once until all finish (after a short warm-up run that compiles the kernels). Device: bf16 matmul "
             f"{ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_tb_per_s']:.2f} TB/s; weight-read floor of a "
             f"batch-1 step {floor_ms:.2f} ms.", "",
             "| path | c | s | ms/step | requests/s | tokens/s | token-forwards/s | share of compute bound |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['path']} | {r['concurrency']} | {r['seconds']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['token_forwards_per_s']:.0f} | "
                     f"{r['share_of_bound']:.0%} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"block_diffusion_{name.lower().replace(' ', '_')}_{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    main()
