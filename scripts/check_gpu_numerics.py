"""bf16 on the GPU against float32: does the fast path compute what the reference computes?

Two checks (issue #8's correctness criterion):

1. Logits. One random LLaDA-shaped model (``--shape``, default llada-8b) in bf16, and the same
   weights held in float32 (exactly equal values). A 512-token sequence whose last block (32 positions)
   is masked runs through (a) the float32 model with the reference dense attention, TF32 off,
   and (b) the bf16 model through the engine's kernels (Triton paged attention on a packed
   refresh step) with logits for the masked rows only. Reported: ||b - a|| / ||a|| over those
   rows, and how often their argmax agrees.
2. Tokens. The embedded trained model decodes ``--num`` test problems greedily on a fixed-steps
   schedule (one token per step) twice: the float32 reference generator on the CPU, and the bf16
   engine on the GPU (Triton path, dual cache off: ``--cache``). Reported: share of generated
   positions whose tokens agree, and exact-match accuracy of each.

    python3 scripts/check_gpu_numerics.py [--out DIR] [--shape llada-8b] [--num 200]

Writes ``gpu_numerics_<device>_<date>.{json,md}`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def logits_check(shape_name: str, device: torch.device, context: int = 512, block: int = 32) -> dict:
    from dilaserve.engine.gpu import select_fast_path
    from dilaserve.engine.gpu.attention import TritonPagedAttention
    from dilaserve.models.packing import pack_projections
    from dilaserve.engine.random_model import SHAPES, build_model
    from dilaserve.models.attention import DenseAttention
    from dilaserve.models.paged_attention import PagedKVCache

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fast = build_model(SHAPES[shape_name], device, seed=0, dtype=torch.bfloat16)
    spec = fast.spec
    ref = build_model(SHAPES[shape_name], device, seed=0, dtype=torch.float32)
    with torch.no_grad():  # the same weights: the bf16 model's, exactly, held in float32
        for (_, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
            p_ref.copy_(p_fast)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.mask_token_id, (context,), generator=gen)
    ids[-block:] = spec.mask_token_id
    ids, positions = ids.to(device), torch.arange(context, device=device)
    rows = torch.arange(context - block, context, device=device)
    with torch.no_grad():
        hidden = ref(ids, positions, DenseAttention([context]))
        a = ref.compute_logits(hidden[rows]).double()
        del ref, hidden
        torch.cuda.empty_cache()
        page = 16
        cache = PagedKVCache(spec.num_layers, context // page + 1, page, spec.num_kv_heads, spec.head_dim,
                             torch.bfloat16, device)
        slots = torch.arange(context, device=device)
        everything = torch.ones(1, context, dtype=torch.bool, device=device)
        # The engine's fast path: packed projections, fused kernels, float32 residual stream.
        ops = select_fast_path(device).block_ops
        pack_projections(fast, interleave_pairs=ops.interleave_gate_up)
        # A refresh: every position computed, its keys and values cached (a large step: cuBLAS).
        refresh = TritonPagedAttention(cache, slots, slots.view(1, -1), everything, slots.view(1, -1), everything)
        b_refresh = fast.compute_logits(fast(ids, positions, refresh, ops)[rows]).double()
        # A reuse step on the block's rows: its queries over the cache, its own keys and values
        # rewritten (a 32-row step: the skinny-GEMM path). What a dual-cache reuse step computes.
        queries = torch.arange(block, device=device).view(1, -1)
        reuse = TritonPagedAttention(cache, slots[rows], queries, torch.ones_like(queries, dtype=torch.bool),
                                     slots.view(1, -1), everything)
        b = fast.compute_logits(fast(ids[rows], positions[rows], reuse, ops)).double()
    del fast, cache
    torch.cuda.empty_cache()
    rel = float((b - a).norm() / a.norm())
    rel_refresh = float((b_refresh - a).norm() / a.norm())
    return {"shape": shape_name, "context": context, "rows": block, "relative_error": rel,
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "target": 1e-2,
            "refresh_relative_error": rel_refresh,
            "refresh_argmax_agreement": float((a.argmax(-1) == b_refresh.argmax(-1)).float().mean())}


def tokens_check(device: torch.device, num: int, max_tokens: int, block: int, cache: str) -> dict:
    from dilaserve.engine.config import EngineConfig
    from dilaserve.engine.engine import Engine
    from dilaserve.engine.sampling_params import SamplingParams
    from dilaserve.eval.quality import encode_prompt
    from dilaserve.generation.reference import GenerationConfig, generate
    from dilaserve.models.registry import load_model
    from dilaserve.models.store import resolve_model
    from dilaserve.models.tokenizer import load_tokenizer
    from dilaserve.tasks import get_task

    model_dir = resolve_model("default")
    tokenizer = load_tokenizer(model_dir)
    problems = get_task("arith").examples("test", num, 0)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    task = get_task("arith")

    cpu_model = load_model(model_dir, device="cpu", dtype=torch.float32)
    stops = {eot, cpu_model.spec.eos_token_id}
    ref_tokens = []
    for prompt in prompts:
        out = generate(cpu_model, prompt, GenerationConfig(gen_length=max_tokens, block_length=block,
                                                           steps=max_tokens, cache=cache))
        ref_tokens.append(out.canvas_ids)
    gpu_model = load_model(model_dir, device=str(device), dtype=torch.bfloat16)
    engine = Engine(gpu_model, EngineConfig(max_running=512, kv_memory_gib=1.0, kernels="triton"))
    params = SamplingParams(max_tokens=max_tokens, block_size=block, steps=max_tokens, cache=cache,
                            stop_token_ids=(eot,))
    for i, prompt in enumerate(prompts):
        engine.add(engine.make_request(f"p{i}", prompt, params))
    canvases = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                canvases[out.request_id] = out.token_ids
    agree = total = 0
    correct_ref = correct_gpu = 0
    for i, (problem, ref) in enumerate(zip(problems, ref_tokens)):
        got = canvases[f"p{i}"]
        ref_emitted = _until_stop(ref, stops)
        n = max(len(ref_emitted), len(got))
        agree += sum(1 for a, b in zip(ref_emitted, got) if a == b)
        total += n
        correct_ref += task.score(tokenizer.decode(ref_emitted, skip_special_tokens=True), problem)
        correct_gpu += task.score(tokenizer.decode(got, skip_special_tokens=True), problem)
    return {"model": "dilaserve-tiny-arith", "problems": num, "max_tokens": max_tokens, "block": block,
            "cache": cache, "schedule": "fixed steps, 1 token per step, greedy", "positions_compared": total,
            "token_agreement": agree / max(total, 1), "accuracy_fp32_reference": correct_ref / num,
            "accuracy_bf16_engine": correct_gpu / num, "target": 0.99}


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """What the engine emits: tokens up to the first end-of-text / end-of-sequence."""
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks"))
    parser.add_argument("--shape", default="llada-8b")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--cache", default="dual", choices=("none", "prefix", "dual"))
    parser.add_argument("--logits-only", action="store_true", help="print the logits check, write nothing")
    parser.add_argument("--variant", default="default",
                        help="large-step matmul options (dilaserve/engine/gpu/matmul.py VARIANTS)")
    args = parser.parse_args()
    from dilaserve.engine.gpu import matmul

    if args.variant not in matmul.VARIANTS:
        parser.error(f"--variant must be one of {sorted(matmul.VARIANTS)}")
    matmul.OPTIONS = matmul.VARIANTS[args.variant]
    if not torch.cuda.is_available():
        raise SystemExit("check_gpu_numerics.py compares the GPU path with float32: it needs a CUDA device")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    start = time.time()
    result = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "variant": args.variant}
    result["logits"] = logits_check(args.shape, device)
    print(json.dumps({"variant": args.variant, **result["logits"]}), flush=True)
    if args.logits_only:
        return
    result["tokens"] = tokens_check(device, args.num, args.max_tokens, args.block, args.cache)
    print(json.dumps(result["tokens"]), flush=True)
    result["wall_s"] = time.time() - start
    lg, tk = result["logits"], result["tokens"]
    md = "\n".join([
        f"# bf16 GPU path vs float32 reference ({name}, {result['date']})", "",
        "`scripts/check_gpu_numerics.py`", "",
        "| check | measured | target |", "|---|---:|---:|",
        f"| logits relative error, {lg['shape']} random weights, a reuse step of {lg['rows']} masked rows at "
        f"context {lg['context']} (after a refresh) | {lg['relative_error']:.2e} | <= 1e-2 |",
        f"| argmax agreement of those rows | {lg['argmax_agreement']:.1%} | - |",
        f"| the same rows' logits from the refresh step (all {lg['context']} positions) | "
        f"{lg['refresh_relative_error']:.2e} | - |",
        f"| greedy fixed-steps tokens agreeing, embedded model, {tk['problems']} problems, "
        f"{tk['positions_compared']} positions ({tk['cache']} cache) | {tk['token_agreement']:.2%} | >= 99% |",
        f"| accuracy: float32 reference (CPU) / bf16 engine (GPU) | {tk['accuracy_fp32_reference']:.1%} / "
        f"{tk['accuracy_bf16_engine']:.1%} | - |", ""])
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_numerics_{name.lower().replace(' ', '_')}_{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    main()
