"""Tiles of ``kernels.fused.silu_mul`` at the engine's shapes: time, bandwidth, identical bits.

The fast path's large steps run the MLP in slices of ``MLP_CHUNK_TOKENS`` (2048) rows: a float32
gate | up product [rows, 2 x 12288] (LLaDA-8B) goes through ``silu_mul`` into a bf16 [rows,
12288]; small steps pass bf16 rows. The kernel only moves memory (plus an exp and a division
per element), so each tile is reported as bytes read + written per second against the
device's copy bandwidth (a large ``Tensor.copy_``, bytes read + written). Every tile must give
the same bits as the one-row tile (the same float32 operations per element); the script checks.

    python3 scripts/sweep_silu_mul.py [--out DIR] [--rows 2048,5888,128] [--repeats 30]
    TRITON_INTERPRET=1 python3 scripts/sweep_silu_mul.py --interpret   # CPU: a check of the script

Writes ``silu_mul_<device>_<date>.{json,md}`` under ``--out`` when given; prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import median_ms  # noqa: E402  (same folder)
from kernels.fused import SiluMulTile, silu_mul, silu_mul_tile  # noqa: E402

TILES = [SiluMulTile(1, 1024, 4), SiluMulTile(1, 2048, 8), SiluMulTile(2, 1024, 4), SiluMulTile(2, 1024, 8),
         SiluMulTile(4, 512, 4), SiluMulTile(4, 1024, 8), SiluMulTile(8, 256, 4), SiluMulTile(8, 512, 8),
         SiluMulTile(16, 256, 8), SiluMulTile(4, 256, 4), SiluMulTile(8, 1024, 16)]


def timed_us(fn, repeats: int, device: torch.device) -> float:
    """Median microseconds of one call (CUDA events; on a CPU, wall time), after one warm-up call."""
    return median_ms(fn, device, warmup=1, reps=repeats) * 1e3


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes read + written per second by a large device copy."""
    n = (1 << 28) if device.type == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    us = timed_us(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", default="2048,5888,128")
    parser.add_argument("--width", type=int, default=12288, help="the MLP's intermediate size")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--interpret", action="store_true", help="tiny shapes for a CPU run under TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.interpret:
        raise SystemExit("sweep_silu_mul.py needs a CUDA GPU (or --interpret under TRITON_INTERPRET=1)")
    rows_list = [int(r) for r in args.rows.split(",") if r]
    width, repeats = args.width, args.repeats
    if args.interpret:
        rows_list, width, repeats = [3, 17], 100, 2
    bw = copy_bandwidth(device, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    result = {"benchmark": "sweep_silu_mul", "date": datetime.date.today().isoformat(), "device": name,
              "torch": torch.__version__, "copy_bytes_per_s": bw, "width": width, "rows": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for in_dtype in (torch.float32, torch.bfloat16):
        for rows in rows_list:
            gate_up = 4 * torch.randn(rows, 2 * width, generator=gen, device=device).to(in_dtype)
            gate, up = gate_up[:, :width], gate_up[:, width:]
            out = torch.empty(rows, width, dtype=torch.bfloat16, device=device)
            moved = gate_up.numel() * gate_up.element_size() + out.numel() * out.element_size()
            first = silu_mul(gate, up, out=out, tile=TILES[0]).clone()
            eager = (F.silu(gate) * up).to(torch.bfloat16)  # float32 inputs: one rounding, as the kernel
            entries = []
            for tile in TILES:
                same = torch.equal(silu_mul(gate, up, out=out, tile=tile), first)
                us = timed_us(lambda t=tile: silu_mul(gate, up, out=out, tile=t), repeats, device)
                entries.append({"tile": [tile.rows, tile.cols, tile.warps], "us": us, "bytes_per_s": moved / (us * 1e-6),
                                "share_of_copy": moved / (us * 1e-6) / bw, "same_bits_as_first": same,
                                "default": tile == silu_mul_tile(rows, width)})
            eager_us = timed_us(lambda: (F.silu(gate) * up).to(torch.bfloat16), repeats, device)
            result["rows"].append({"rows": rows, "in_dtype": str(in_dtype).replace("torch.", ""), "bytes": moved,
                                   "eager_us": eager_us, "max_diff_vs_eager": (first.float() - eager.float()).abs().max().item(),
                                   "tiles": entries})
            print(f"{rows} rows {in_dtype}: best {min(e['us'] for e in entries):.1f} us, "
                  f"one-row tile {entries[0]['us']:.1f} us, eager {eager_us:.1f} us", flush=True)
    lines = [f"# silu_mul tiles on {name} ({result['date']})", "",
             f"Width {width} (out bf16). Copy bandwidth {bw / 1e12:.2f} TB/s (read + write). Median of {repeats}.", "",
             "| in | rows | tile (rows x cols, warps) | us | TB/s | share of copy | same bits | default |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        for e in r["tiles"]:
            t = e["tile"]
            lines.append(f"| {r['in_dtype']} | {r['rows']} | {t[0]} x {t[1]}, {t[2]} | {e['us']:.1f} | "
                         f"{e['bytes_per_s'] / 1e12:.2f} | {e['share_of_copy']:.0%} | {e['same_bits_as_first']} | "
                         f"{'yes' if e['default'] else ''} |")
        lines.append(f"| {r['in_dtype']} | {r['rows']} | eager torch | {r['eager_us']:.1f} | "
                     f"{r['bytes'] / (r['eager_us'] * 1e-6) / 1e12:.2f} | | max diff {r['max_diff_vs_eager']:.2g} | |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        stem = out_dir / f"silu_mul_{slug}_{result['date']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(table)
        print(f"wrote {stem}.json and .md")
    if not all(e["same_bits_as_first"] for r in result["rows"] for e in r["tiles"]):
        raise SystemExit("some tile gave other bits than the one-row tile")


if __name__ == "__main__":
    main()
