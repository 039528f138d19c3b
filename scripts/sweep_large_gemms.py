"""The large steps' matmuls on a GPU: cuBLAS as the fast path calls it against the alternatives.

  python3 scripts/sweep_large_gemms.py --out DIR [--rows 512,1024,2048,5888]

LLaDA-8B shapes (K 4096, intermediate 12288), bf16 operands, random data. For each row count:

- gate | up + silu x up: cuBLAS bf16 output + ``fused.silu_mul`` (bf16 products: rounded twice),
  cuBLAS float32 output + ``fused.silu_mul`` (the fast path's default), and the one-kernel
  ``kernels/swiglu_gemm.py`` at each config of ``CONFIGS`` (its relative error against the
  default's result is reported: both round once);
- o / down into the float32 stream: ``residual.add_(mm(out_dtype=float32))`` (default) against
  cuBLAS accumulating into the stream (``addmm.dtype_out``, beta 1);
- q | k | v: the matmul with a bf16 against a float32 output.

Times are medians of CUDA-event-timed calls. Writes ``large_gemms_<device>_<date>.{json,md}``.

    TRITON_INTERPRET=1 python3 scripts/sweep_large_gemms.py --interpret   # CPU: a check of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as bench  # noqa: E402

from kernels.fused import silu_mul  # noqa: E402
from kernels.swiglu_gemm import SwigluGemmConfig, interleave_gate_up, swiglu_linear  # noqa: E402

# (config, group): group 0 is the packed gate | up weight; 1 and block_n are the interleaved
# row orders of ``interleave_gate_up`` (one dot a K step instead of two; tensor descriptors only)
CONFIGS = [
    (SwigluGemmConfig(128, 128, 64, 8, 4, 8), 0),  # the best pointer configs of 2026-12-05
    (SwigluGemmConfig(128, 128, 32, 8, 5, 8), 0),
    (SwigluGemmConfig(128, 128, 64, 8, 3, 8, tma=True), 0),
    (SwigluGemmConfig(128, 128, 64, 8, 4, 8, tma=True), 0),
    (SwigluGemmConfig(128, 128, 64, 8, 3, 8, tma=True, persistent=True), 0),
    (SwigluGemmConfig(128, 128, 64, 8, 3, 8, tma=True), 1),
    (SwigluGemmConfig(128, 128, 64, 8, 4, 8, tma=True), 1),
    (SwigluGemmConfig(128, 128, 64, 8, 3, 8, tma=True, persistent=True), 1),
    (SwigluGemmConfig(128, 128, 64, 8, 4, 8, tma=True, persistent=True), 1),
    (SwigluGemmConfig(128, 64, 64, 8, 4, 4, tma=True), 1),
    (SwigluGemmConfig(128, 64, 64, 8, 4, 8, tma=True), 1),
    (SwigluGemmConfig(128, 64, 64, 8, 4, 4, tma=True, persistent=True), 1),
    (SwigluGemmConfig(64, 128, 64, 8, 4, 4, tma=True), 1),
    (SwigluGemmConfig(128, 128, 64, 8, 3, 8, tma=True), 128),
    (SwigluGemmConfig(128, 128, 64, 8, 4, 8, tma=True, persistent=True), 128),
    (SwigluGemmConfig(128, 64, 64, 8, 4, 4, tma=True), 64),
]


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="large-gemms-out")
    parser.add_argument("--rows", default="512,1024,2048,5888")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--interpret", action="store_true", help="tiny shapes for a CPU run under TRITON_INTERPRET=1")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.interpret:
        raise SystemExit("sweep_large_gemms.py needs a CUDA GPU (or --interpret under TRITON_INTERPRET=1)")
    d, inter = 4096, 12288
    if args.interpret:  # every config and path once, on shapes that leave partial row tiles
        from kernels.interpreter import fix_scalar_index

        fix_scalar_index()
        d, inter, args.rows, args.reps = 64, 256, "40,130", 1
    gen = torch.Generator(device=dev).manual_seed(0)

    def mm32(a, b_t):
        """``a @ b_t`` in float32 as the fast path asks cuBLAS for it (CPU: the operands widened)."""
        return torch.mm(a, b_t, out_dtype=torch.float32) if dev.type == "cuda" else a.float() @ b_t.float()

    def addmm32(acc, a, b_t):
        if dev.type == "cuda":
            return torch.ops.aten.addmm.dtype_out(acc, a, b_t, torch.float32, out=acc)
        return acc.add_(a.float() @ b_t.float())

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(torch.bfloat16)

    w_gate_up = rnd(2 * inter, d, scale=d ** -0.5)
    reordered = {g: interleave_gate_up(w_gate_up, g) for g in sorted({g for _, g in CONFIGS})}
    w_down, w_o, w_qkv = rnd(d, inter, scale=inter ** -0.5), rnd(d, d, scale=d ** -0.5), rnd(3 * d, d, scale=d ** -0.5)

    def timed(fn) -> float:
        return bench.median_ms(fn, dev, warmup=3, reps=args.reps)

    rows_out = []
    for m in (int(r) for r in args.rows.split(",")):
        x = rnd(m, d)
        row: dict = {"rows": m}

        def bf16_path():
            return silu_mul(torch.nn.functional.linear(x, w_gate_up))

        def fp32_path():
            g = mm32(x, w_gate_up.t())
            gate, up = g.split(inter, dim=1)
            return silu_mul(gate, up, out=torch.empty(m, inter, dtype=torch.bfloat16, device=dev))

        ref = fp32_path()
        row["gate_up"] = {
            "cublas_bf16_matmul_ms": timed(lambda: torch.nn.functional.linear(x, w_gate_up)),
            "cublas_fp32_matmul_ms": timed(lambda: mm32(x, w_gate_up.t())),
            "bf16_products_ms": timed(bf16_path),
            "fp32_products_ms": timed(fp32_path),
            "configs": [],
        }
        for cfg, group in CONFIGS:
            entry = {"config": dict(vars(cfg), group=group)}
            try:
                w = reordered[group]
                got = swiglu_linear(x, w, config=cfg, group=group)
                entry["relative_error"] = float((got.double() - ref.double()).norm() / ref.double().norm())
                entry["ms"] = timed(lambda cfg=cfg, w=w, group=group: swiglu_linear(x, w, config=cfg, group=group))
                entry["tflops"] = tflops(m, 2 * inter, d, entry["ms"])
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                entry["error"] = repr(exc)[:300]
            row["gate_up"]["configs"].append(entry)
            print(m, entry, flush=True)
        row["gate_up"]["cublas_fp32_tflops"] = tflops(m, 2 * inter, d, row["gate_up"]["cublas_fp32_matmul_ms"])
        # o / down into the float32 stream
        for name, w in (("o", w_o), ("down", w_down)):
            xin = rnd(m, w.shape[1])
            stream = torch.randn(m, d, device=dev, generator=gen)
            expect = stream + mm32(xin, w.t())
            got = addmm32(stream.clone(), xin, w.t())
            s1, s2 = stream.clone(), stream.clone()
            row[name] = {
                "mm_then_add_ms": timed(lambda: s1.add_(mm32(xin, w.t()))),
                "addmm_in_place_ms": timed(lambda: addmm32(s2, xin, w.t())),
                "bf16_then_add_ms": timed(lambda: s1.add_(torch.nn.functional.linear(xin, w))),
                "addmm_max_abs_diff": float((got - expect).abs().max()),
            }
        row["qkv"] = {"bf16_ms": timed(lambda: torch.nn.functional.linear(x, w_qkv)),
                      "fp32_ms": timed(lambda: mm32(x, w_qkv.t()))}
        rows_out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "gate_up"}), flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter)"
    result = {"benchmark": "sweep_large_gemms", "device": name, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "rows": rows_out}
    lines = [f"# Large-step matmuls on {name} ({result['date']})", "",
             "LLaDA-8B shapes, bf16 operands, median ms of CUDA-event-timed calls.", "",
             "## gate | up + silu x up", "",
             "| rows | cuBLAS bf16 matmul | cuBLAS fp32 matmul (TFLOP/s) | bf16 products + silu_mul | "
             "fp32 products + silu_mul (default) | best one-kernel config | its ms (TFLOP/s) | its rel. error |",
             "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows_out:
        g = r["gate_up"]
        ok = [c for c in g["configs"] if "ms" in c]
        best = min(ok, key=lambda c: c["ms"]) if ok else None
        lines.append(
            f"| {r['rows']} | {g['cublas_bf16_matmul_ms']:.3f} | {g['cublas_fp32_matmul_ms']:.3f} "
            f"({g['cublas_fp32_tflops']:.0f}) | {g['bf16_products_ms']:.3f} | {g['fp32_products_ms']:.3f} | "
            + (f"{best['config']} | {best['ms']:.3f} ({best['tflops']:.0f}) | {best['relative_error']:.1e} |"
               if best else "- | - | - |"))
    lines += ["", "## Every one-kernel config (ms, TFLOP/s)", "",
              "| config | group | " + " | ".join(f"{r['rows']} rows" for r in rows_out) + " |",
              "|---|---:|" + "---:|" * len(rows_out)]
    for i, (cfg, group) in enumerate(CONFIGS):
        cells = []
        for r in rows_out:
            c = r["gate_up"]["configs"][i]
            cells.append(f"{c['ms']:.3f} ({c['tflops']:.0f})" if "ms" in c else "failed")
        label = (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} w{cfg.num_warps}"
                 + (" tma" if cfg.tma else "") + (" persistent" if cfg.persistent else ""))
        lines.append(f"| {label} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "## o / down into the float32 stream, q | k | v", "",
              "| rows | o: mm + add | o: addmm | down: mm + add | down: addmm | down: bf16 + add | qkv bf16 | qkv fp32 |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows_out:
        lines.append(f"| {r['rows']} | {r['o']['mm_then_add_ms']:.3f} | {r['o']['addmm_in_place_ms']:.3f} | "
                     f"{r['down']['mm_then_add_ms']:.3f} | {r['down']['addmm_in_place_ms']:.3f} | "
                     f"{r['down']['bf16_then_add_ms']:.3f} | {r['qkv']['bf16_ms']:.3f} | {r['qkv']['fp32_ms']:.3f} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    stem = out / f"large_gemms_{slug}_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
