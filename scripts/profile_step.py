"""Where a batch-1 reuse step's time goes, on a GPU (the LLaDA-8B shape, random bf16 weights).

  python3 scripts/profile_step.py --out DIR [--tiny]

Prints and writes (``DIR/profile_step_<device>.json`` / ``.md``):
- each block projection and the LM head as a skinny matmul at M = 1, 32, 128 rows: time and
  weight bytes per second against the device copy bandwidth, and the same projections packed
  (q|k|v as one weight, gate|up as one);
- the kernels of one eager Triton-path step (block 32, context 512) under the CUDA profiler,
  grouped (matmul, attention, fused element-wise, logits, other), against the step's
  CUDA-graph time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as bench  # noqa: E402  (same folder: its builders and timers)

from dilaserve.engine.random_model import LLADA_8B, TINY, build_model  # noqa: E402
from dilaserve.models.packing import pack_projections  # noqa: E402
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache  # noqa: E402


def matmul_table(spec, device, copy_tb_s: float, rows: tuple[int, ...]) -> list[dict]:
    d, f, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    shapes = {"q/o": (d, d), "k/v": (kv, d), "gate/up": (f, d), "down": (d, f), "qkv packed": (d + 2 * kv, d),
              "gate|up packed": (2 * f, d), "lm head": (spec.vocab_size, d)}
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            reps = 20  # per-call time of back-to-back calls replayed from one CUDA graph
            ms = bench.graphed_ms(lambda: [torch.nn.functional.linear(x, w) for _ in range(reps)], device) / reps
            nbytes = w.numel() * 2
            out.append({"matmul": name, "rows": m, "n": n, "k": k, "ms": ms, "weight_gb_per_s": nbytes / ms / 1e6,
                        "share_of_copy_bw": nbytes / ms / 1e9 / copy_tb_s})
        del w
    return out


def launch_costs(spec, device) -> list[dict]:
    """Host microseconds per call of each op a fused block launches, on one token (the GPU work
    is tiny, so back-to-back calls measure the launch path: what an eager step pays per op)."""
    import time

    from kernels import fused
    from kernels.paged_attention import paged_attention, write_kv_, write_kv_reference

    d, h, kvh, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    x = torch.randn(1, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(d, d, device=device, dtype=torch.bfloat16)
    norm_w = torch.ones(d, device=device, dtype=torch.bfloat16)
    q, k = torch.randn(1, h, hd, device=device, dtype=torch.bfloat16), torch.randn(1, kvh, hd, device=device,
                                                                                 dtype=torch.bfloat16)
    cos = torch.randn(1, 1, hd, device=device, dtype=torch.float32)
    pool = torch.zeros(64, kvh, hd, device=device, dtype=torch.bfloat16)
    pool2 = torch.zeros_like(pool)
    slots = torch.tensor([3], device=device)
    starts = torch.tensor([0, 1], device=device, dtype=torch.int32)
    tables = torch.tensor([[0, 1, 2, 3]], device=device, dtype=torch.int32)
    lens = torch.tensor([64], device=device, dtype=torch.int32)
    ops = {
        "F.linear": lambda: torch.nn.functional.linear(x, w),
        "tensor add": lambda: x + x,
        "fused.rms_norm": lambda: fused.rms_norm(x, norm_w, 1e-5),
        "fused.add_rms_norm": lambda: fused.add_rms_norm(x, x, norm_w, 1e-5),
        "fused.rotary": lambda: fused.rotary(q, k, cos, cos),
        "fused.silu_mul": lambda: fused.silu_mul(x, x),
        "write_kv_ (Triton)": lambda: write_kv_(pool, pool2, slots, k, k),
        "write_kv_reference (2 index_copy_)": lambda: write_kv_reference(pool, pool2, slots, k, k),
        "fused.rotary_store_kv (rotary + write_kv_)": lambda: fused.rotary_store_kv(q, k, k, cos, cos, pool, pool2,
                                                                                    slots),
        "paged_attention, 1 split": lambda: paged_attention(q, pool, pool2, starts, tables, lens, 16, max_queries=1,
                                                            num_splits=1),
        "paged_attention, 8 splits (+ merge)": lambda: paged_attention(q, pool, pool2, starts, tables, lens, 16,
                                                                       max_queries=1, num_splits=8),
    }
    out = []
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host_us = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize(device)
        out.append({"op": name, "host_us_per_call": host_us})
    return out


def layer_estimate(table: list[dict], spec, rows: int) -> dict:
    ms = {r["matmul"]: r["ms"] for r in table if r["rows"] == rows}
    separate = 2 * ms["q/o"] + 2 * ms["k/v"] + 2 * ms["gate/up"] + ms["down"]
    packed = ms["qkv packed"] + ms["q/o"] + ms["gate|up packed"] + ms["down"]
    return {"rows": rows, "separate_ms": spec.num_layers * separate + ms["lm head"],
            "packed_ms": spec.num_layers * packed + ms["lm head"]}


def group(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("gemm", "cutlass", "nvjet", "sm90", "cublas", "splitk", "matmul")):
        return "matmul"
    if "attention" in lowered or "paged" in lowered or "attn" in lowered:
        return "attention"
    if any(s in lowered for s in ("rms", "rotary", "silu", "norm")):
        return "fused element-wise"
    if any(s in lowered for s in ("logit", "greedy", "argmax", "confidence", "vocab")):
        return "logits"
    return "other"


@torch.inference_mode()
def step_profile(model, device, context: int, block: int, prompt: int) -> dict:
    spec, page_size = model.spec, 16
    cache = PagedKVCache(spec.num_layers, -(-context // page_size), page_size, spec.num_kv_heads, spec.head_dim,
                         next(model.parameters()).dtype, device)
    ids = torch.randint(0, spec.mask_token_id, (context,), device=device)
    positions = torch.arange(context, device=device)
    model(ids, positions, PagedAttention(cache, *bench.paged_layout(1, context, 0, context, page_size, device)))
    backend = bench.triton_backend_cls()(cache, *bench.paged_layout(1, context, prompt, prompt + block, page_size,
                                                                     device))
    ops = bench.block_ops()
    q_ids, q_pos = ids[prompt:prompt + block], positions[prompt:prompt + block]

    def step():
        return bench.greedy_triton(model, model(q_ids, q_pos, backend, ops))

    eager_ms = bench.median_ms(step, device, warmup=3, reps=10)
    graph_ms = bench.graphed_ms(step, device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    totals, counts, kernels = defaultdict(float), defaultdict(int), defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time if hasattr(event, "device_time") else event.cuda_time
        totals[group(event.name)] += us / 1e3
        counts[group(event.name)] += 1
        kernels[event.name[:90]] += us / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"context": context, "block": block, "eager_ms": eager_ms, "graph_ms": graph_ms,
            "kernel_ms": sum(totals.values()), "groups": {g: {"ms": totals[g], "kernels": counts[g]} for g in totals},
            "top_kernels": [{"name": n, "ms": ms} for n, ms in top]}


def markdown(result: dict) -> str:
    lines = [f"# Batch-1 step profile on {result['device']} ({result['date']})", "",
             "## Skinny matmuls (bf16, weight bytes / time vs device copy bandwidth "
             f"{result['copy_tb_per_s']:.2f} TB/s)", "",
             "| matmul | rows | n x k | us | weight GB/s | share of copy bw |", "|---|---:|---|---:|---:|---:|"]
    for r in result["matmuls"]:
        lines.append(f"| {r['matmul']} | {r['rows']} | {r['n']} x {r['k']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['weight_gb_per_s']:.0f} | {r['share_of_copy_bw']:.0%} |")
    lines += ["", "Per step (all layers + LM head), from the table:", ""]
    launch = result.get("launch", [])
    for e in result["layer_estimates"]:
        lines.append(f"- {e['rows']} rows: separate projections {e['separate_ms']:.2f} ms, packed {e['packed_ms']:.2f} ms")
    for key, title in (("step", "separate projections"), ("step_packed", "packed projections")):
        p = result.get(key)
        if not p:
            continue
        lines += ["", f"## One step, {title} (block {p['block']}, context {p['context']}): eager {p['eager_ms']:.2f} ms, "
                  f"CUDA graph {p['graph_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms", "",
                  "| group | ms | kernels |", "|---|---:|---:|"]
        for g, v in sorted(p["groups"].items(), key=lambda kv: -kv[1]["ms"]):
            lines.append(f"| {g} | {v['ms']:.3f} | {v['kernels']} |")
        lines += ["", "| kernel | ms |", "|---|---:|"]
        lines += [f"| `{k['name']}` | {k['ms']:.3f} |" for k in p["top_kernels"]]
    if launch:
        lines += ["", "## Host cost per eager call (one token, back to back)", "", "| op | us / call |", "|---|---:|"]
        lines += [f"| {r['op']} | {r['host_us_per_call']:.1f} |" for r in launch]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile-out")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a quick check of the script)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    device = torch.device("cuda")
    ceilings = bench.device_ceilings(device, args.tiny)
    model = build_model(TINY if args.tiny else LLADA_8B, device)
    result = {"device": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "copy_tb_per_s": ceilings["copy_tb_per_s"],
              "matmul_tflops": ceilings["matmul_tflops"]}
    result["launch"] = launch_costs(model.spec, device)
    result["matmuls"] = matmul_table(model.spec, device, ceilings["copy_tb_per_s"], (1, 32, 128))
    result["layer_estimates"] = [layer_estimate(result["matmuls"], model.spec, m) for m in (1, 32, 128)]
    result["step"] = step_profile(model, device, context=512, block=32, prompt=256)
    pack_projections(model, interleave_pairs=bench.block_ops().interleave_gate_up)
    result["step_packed"] = step_profile(model, device, context=512, block=32, prompt=256)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in result["device"].lower()).strip("_")
    (out / f"profile_step_{slug}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / f"profile_step_{slug}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
