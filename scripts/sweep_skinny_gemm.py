"""Skinny GEMM sweep: kernels/skinny_gemm.py's Triton configs against cuBLAS (F.linear), on a GPU.

  python3 scripts/sweep_skinny_gemm.py --out DIR [--quick] [--budget-s 240] [--same-weight]
  TRITON_INTERPRET=1 python3 scripts/sweep_skinny_gemm.py --tiny    # CPU smoke check: correctness only

The batch-1 decoding matmuls of an LLaDA-8B-shaped model (bf16, y = x @ w.T, w [N, K]) at M = 1,
16, 32, 64, 128 rows: packed qkv (12288 x 4096), o (4096 x 4096), packed gate|up (24576 x 4096),
down (4096 x 12288), and down with silu_mul fused into its A loads (gate_up [M, 24576] in).
For each shape and M:

- cuBLAS: ``F.linear`` (for the fused shape: ``fused.silu_mul`` then ``F.linear``);
- every candidate Triton config (block sizes, stages, warps, swap_ab; ~50 per cell, pruned by
  shared memory, bytes in flight and programs per SM), each checked against cuBLAS (max |diff| /
  max |cuBLAS|) before it is timed; the default config is always among them;
- for o, down and the fused down (the projections that feed the residual stream): the residual
  epilogue (fp32 residual updated in place) of the 3 best configs against ``F.linear`` + ``add_``.

Timing: 20 back-to-back calls captured in one CUDA graph and replayed (``bench_engine.graphed_ms``,
median of 20 replays), per call. The 20 calls cycle through copies of the weight that together
exceed 3x the L2 cache, as a real step reads each layer's weight once (``--same-weight``: one
weight, as profile_step.py measures, partly served from L2). Weight GB/s = weight bytes / time;
its share is against the device copy bandwidth (read + written bytes / time of a 4 GiB copy,
``bench_engine.device_ceilings``).

Compiling takes ~0.3-2 s per config (420 distinct kernels in the default sweep; all of them were
checked to compile for sm_90 without spills or more than 200 KiB of shared memory); they are
first compiled by ``--compile-workers`` processes into Triton's on-disk cache, from which the
timing process loads them. ``--budget-s``
bounds the whole run: each (shape, M) cell gets an equal share of what is left, and a cell that
runs out reports the configs it timed. Writes ``skinny_gemm_<device>.{json,md}`` under ``--out``
(the JSON after every cell) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # kernels / dilaserve, and bench_engine beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

CALLS_PER_GRAPH = 20
MAX_CONFIGS_PER_CELL = 50
QUICK_CONFIGS_PER_CELL = 10
RESIDUAL_TOP_CONFIGS = 3
SMEM_LIMIT_BYTES = 200 * 1024  # on SkinnyGemmConfig.smem_bytes, an upper bound; H200 allows 227 KiB a block
MAX_REL_ERR = 2e-2  # two bf16 roundings (ours and cuBLAS's) of sums in another order
L2_COPIES_FACTOR = 3  # rotated weight copies cover this many L2 caches


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # output columns (w's rows)
    k: int  # reduction length (for silu_mul: I, gate_up being [M, 2I])
    is_silu_mul: bool = False
    has_residual_variant: bool = False  # its output feeds the residual stream


SHAPES = (
    Shape("qkv", 12288, 4096),
    Shape("o", 4096, 4096, has_residual_variant=True),
    Shape("gate|up", 24576, 4096),
    Shape("down", 4096, 12288, has_residual_variant=True),
    Shape("down silu_mul fused", 4096, 12288, is_silu_mul=True, has_residual_variant=True),
)
TINY_SHAPES = (
    Shape("qkv", 96, 64),
    Shape("o", 64, 64, has_residual_variant=True),
    Shape("gate|up", 192, 64),
    Shape("down", 64, 96, has_residual_variant=True),
    Shape("down silu_mul fused", 64, 96, is_silu_mul=True, has_residual_variant=True),
)
ROWS = (1, 16, 32, 64, 128)
QUICK_ROWS = (1, 32, 128)
TINY_ROWS = (1, 3, 17)


# --- Candidate configs ---------------------------------------------------------------------------


def _stable_rank(cfg) -> str:
    """An order that looks random but is the same in every cell: a config common to several
    cells is kept (or cut) in all of them, so fewer distinct kernels are compiled."""
    return hashlib.sha1(repr(sorted(asdict(cfg).items())).encode()).hexdigest()


def _worth_timing(cfg, num_rows: int, shape: Shape, num_sms: int) -> bool:
    """Prunes configs that cannot stream the weight well (or do not fit)."""
    num_programs = -(-shape.n // cfg.block_n) * -(-num_rows // cfg.block_m)
    weight_in_flight = (cfg.num_stages - 1) * cfg.block_n * cfg.block_k * 2
    return ((cfg.block_n == 16 or num_programs >= num_sms // 3)  # enough programs to pull the bandwidth
            and 8 * 1024 <= weight_in_flight <= 64 * 1024  # hides DRAM latency; a few programs fit an SM
            and (cfg.num_warps == 4 or cfg.block_m * cfg.block_n >= 2048)  # 8 warps need a tile to share
            and (not cfg.swap_ab or cfg.block_n >= 64)  # swapped, BLOCK_N is the MMA's M side (64 on Hopper)
            and cfg.smem_bytes(shape.is_silu_mul) <= SMEM_LIMIT_BYTES)


def candidate_configs(num_rows: int, shape: Shape, num_sms: int, max_configs: int, tiny: bool) -> list:
    """The default config, then pruned candidates in a stable pseudo-random order (a cell cut
    short by the budget has timed a fair sample)."""
    from kernels.skinny_gemm import SkinnyGemmConfig, default_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = default_config(num_rows, shape.n, shape.k, device)
    block_m = min(max(16, 1 << (num_rows - 1).bit_length()), 64)
    if tiny:
        return [default, SkinnyGemmConfig(block_m=block_m, block_n=16, block_k=32, num_stages=2),
                SkinnyGemmConfig(block_m=block_m, block_n=64, block_k=64, num_stages=3, swap_ab=True)]
    block_ms = [block_m] + ([128] if num_rows > 64 else [])  # M = 128: two row tiles, or one
    grid = itertools.product(block_ms, (16, 32, 64, 128), (64, 128, 256), (3, 4, 5, 6), (4, 8), (False, True))
    found = [cfg for bm, bn, bk, stages, warps, swap in grid
             if (cfg := SkinnyGemmConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=stages, num_warps=warps,
                                         swap_ab=swap)) != default and _worth_timing(cfg, num_rows, shape, num_sms)]
    found.sort(key=_stable_rank)
    return [default, *found[:max_configs - 1]]


# --- Compiling in worker processes ---------------------------------------------------------------


def _compile_job(job: tuple) -> tuple[tuple, float, str | None]:
    """Runs one config once on small tensors whose specialization (dtypes, 16-byte alignment and
    divisibility of sizes and strides, K a multiple of BLOCK_K, M for silu_mul's row count) matches
    the sweep's, so Triton's on-disk cache then holds the kernel the sweep launches. Runs in a
    worker process."""
    is_silu_mul, has_residual, num_rows, cfg_fields = job
    start = time.perf_counter()
    try:
        from kernels.skinny_gemm import SkinnyGemmConfig, skinny_linear, skinny_silu_mul_linear

        cfg = SkinnyGemmConfig(**dict(cfg_fields))
        n, k, device = 256, 512, torch.device("cuda")
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        residual = torch.zeros(num_rows, n, device=device) if has_residual else None
        if is_silu_mul:
            gate_up = torch.randn(num_rows, 2 * k, device=device, dtype=torch.bfloat16)
            skinny_silu_mul_linear(gate_up, w, residual=residual, out=residual, config=cfg)
        else:
            x = torch.randn(num_rows, k, device=device, dtype=torch.bfloat16)
            skinny_linear(x, w, residual=residual, out=residual, config=cfg)
        torch.cuda.synchronize()
        return job, time.perf_counter() - start, None
    except Exception as exc:  # a config that cannot compile is reported, not fatal
        return job, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300]


def precompile(jobs: list[tuple], workers: int, seconds: float, log) -> dict:
    """Compiles ``jobs`` (is_silu_mul, has_residual, M, config fields) in parallel for at most
    ``seconds``; returns counts and the configs that failed. Whatever it misses compiles later,
    in the timing process."""
    unique = sorted(set(jobs))
    stats = {"jobs": len(unique), "compiled": 0, "failed": {}, "seconds": 0.0, "workers": workers}
    if workers <= 0 or not unique or seconds <= 0:
        return stats
    start = time.perf_counter()
    log(f"compiling {len(unique)} kernels in {workers} processes (at most {seconds:.0f} s)")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_compile_job, job) for job in unique]
            done, pending = wait(futures, timeout=seconds)
            for future in pending:
                future.cancel()
            for future in done:
                job, _, error = future.result()
                if error:
                    stats["failed"][repr(job)] = error
                else:
                    stats["compiled"] += 1
    except Exception as exc:  # e.g. a worker process died: the sweep compiles what is missing itself
        stats["error"] = f"{type(exc).__name__}: {exc}"[:300]
    stats["seconds"] = time.perf_counter() - start
    log(f"compiled {stats['compiled']} / {len(unique)} in {stats['seconds']:.0f} s, {len(stats['failed'])} failed"
        + (f" ({stats['error']})" if "error" in stats else ""))
    return stats


def _job(shape: Shape, num_rows: int, has_residual: bool, cfg) -> tuple:
    # M only selects a kernel for silu_mul (its A_ROWS); elsewhere BLOCK_M rows compile the same one.
    rows = num_rows if shape.is_silu_mul else cfg.block_m
    return shape.is_silu_mul, has_residual, rows, tuple(sorted(asdict(cfg).items()))


# --- Timing one cell -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    device: torch.device
    on_gpu: bool  # False: the interpreter smoke check, correctness only
    same_weight: bool
    copy_tb_s: float | None
    deadline: float  # time.perf_counter() at which the budget is spent


class Cell:
    """The operands of one (shape, M) cell and its cuBLAS and Triton calls."""

    def __init__(self, shape: Shape, num_rows: int, setup: Setup):
        from kernels import fused, skinny_gemm

        self.shape, self.num_rows, self.setup = shape, num_rows, setup
        self.silu_mul = fused.silu_mul
        self.kernel = skinny_gemm.skinny_silu_mul_linear if shape.is_silu_mul else skinny_gemm.skinny_linear
        gen = torch.Generator(device=setup.device).manual_seed(num_rows)
        width = 2 * shape.k if shape.is_silu_mul else shape.k
        self.a = torch.randn(num_rows, width, device=setup.device, dtype=torch.bfloat16, generator=gen)
        self.weight_bytes = shape.n * shape.k * 2
        copies = 1
        if setup.on_gpu and not setup.same_weight:
            l2 = getattr(torch.cuda.get_device_properties(setup.device), "L2_cache_size", 50 << 20)
            copies = max(1, min(CALLS_PER_GRAPH, math.ceil(L2_COPIES_FACTOR * l2 / self.weight_bytes)))
        self.weights = [torch.randn(shape.n, shape.k, device=setup.device, dtype=torch.bfloat16, generator=gen)
                        / math.sqrt(shape.k) for _ in range(copies)]
        self.residual = torch.randn(num_rows, shape.n, device=setup.device, generator=gen)
        self.expected = self.cublas(self.weights[0]).float()

    def cublas(self, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        a = self.silu_mul(self.a) if self.shape.is_silu_mul else self.a
        y = F.linear(a, w)
        return y if residual is None else residual.add_(y)

    def triton(self, w: torch.Tensor, cfg, residual: torch.Tensor | None = None, in_place: bool = True):
        return self.kernel(self.a, w, residual=residual, out=residual if in_place else None, config=cfg)

    def max_rel_err(self, cfg, has_residual: bool) -> float:
        """max |Triton - cuBLAS| / max |cuBLAS| (the residual variant out of place, minus the residual)."""
        if has_residual:
            y = self.triton(self.weights[0], cfg, self.residual, in_place=False) - self.residual
        else:
            y = self.triton(self.weights[0], cfg).float()
        return float((y - self.expected).abs().max() / self.expected.abs().max().clamp_min(1e-30))

    def timing(self, call) -> dict:
        """``call(w)`` on each of 20 weights in turn, replayed from one CUDA graph: per-call time and rates."""
        import bench_engine as bench

        def calls():
            for i in range(CALLS_PER_GRAPH):
                call(self.weights[i % len(self.weights)])

        us = bench.graphed_ms(calls, self.setup.device) / CALLS_PER_GRAPH * 1e3
        gb_s = self.weight_bytes / us / 1e3
        copy = self.setup.copy_tb_s
        return {"us": us, "weight_gb_per_s": gb_s, "share_of_copy_bw": gb_s / 1e3 / copy if copy else None}


def measure(cell: Cell, cfg, has_residual: bool) -> dict:
    row = {"config": asdict(cfg)}
    start = time.perf_counter()
    try:
        row["max_rel_err"] = cell.max_rel_err(cfg, has_residual)
        row["first_call_s"] = time.perf_counter() - start  # ~0.1 s when the compile came from the cache
        if not row["max_rel_err"] <= MAX_REL_ERR:
            row["error"] = f"max relative error {row['max_rel_err']:.3g} > {MAX_REL_ERR}"
        elif cell.setup.on_gpu:
            residual = cell.residual.clone() if has_residual else None
            row.update(cell.timing(lambda w: cell.triton(w, cfg, residual)))
    except Exception as exc:  # out of resources, a launch failure: reported, the sweep goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def sweep_cell(cell: Cell, configs: list, has_residual: bool, deadline: float) -> dict:
    """cuBLAS, then the configs in order until ``deadline`` (the first one always)."""
    shape = cell.shape
    result = {"matmul": shape.name + (" + residual" if has_residual else ""), "rows": cell.num_rows,
              "n": shape.n, "k": shape.k, "has_residual": has_residual, "weight_copies": len(cell.weights),
              "configs": [], "configs_skipped": 0}
    if cell.setup.on_gpu:
        residual = cell.residual.clone() if has_residual else None
        result["cublas"] = cell.timing(lambda w: cell.cublas(w, residual))
    for i, cfg in enumerate(configs):
        if i > 0 and time.perf_counter() > deadline:
            result["configs_skipped"] = len(configs) - i
            break
        result["configs"].append(measure(cell, cfg, has_residual))
    timed = [r for r in result["configs"] if "us" in r]
    if timed:
        result["best"] = min(timed, key=lambda r: r["us"])
        result["speedup"] = result["cublas"]["us"] / result["best"]["us"]
    if result["configs"] and "us" in result["configs"][0]:
        result["default"] = result["configs"][0]
    return result


def run_cells(cells: list[tuple], setup: Setup, result: dict, save, log, cells_after: float = 0.0) -> None:
    """Sweeps (shape, M, has_residual, configs) cells, each given an equal share of the budget
    left (``cells_after``: how many cells' worth of budget to keep for a later call)."""
    with torch.inference_mode():
        for done, (shape, m, has_residual, configs) in enumerate(cells):
            share = (setup.deadline - time.perf_counter()) / (len(cells) - done + cells_after)
            cell_result = sweep_cell(Cell(shape, m, setup), configs, has_residual, time.perf_counter() + share)
            result["cells"].append(cell_result)
            best, base = cell_result.get("best"), cell_result.get("cublas")
            log(f"{cell_result['matmul']} M={m}: {len(cell_result['configs'])} configs"
                + (f", cuBLAS {base['us']:.1f} us, best Triton {best['us']:.1f} us" if best else ""))
            save()


def best_configs(cell_result: dict, count: int) -> list:
    from kernels.skinny_gemm import SkinnyGemmConfig

    tried = cell_result["configs"]
    ranked = sorted((r for r in tried if "us" in r), key=lambda r: r["us"]) or tried[:1]
    return [SkinnyGemmConfig(**r["config"]) for r in ranked[:count]]


# --- Report --------------------------------------------------------------------------------------


def _config_label(cfg: dict) -> str:
    label = f"m{cfg['block_m']} n{cfg['block_n']} k{cfg['block_k']} s{cfg['num_stages']} w{cfg['num_warps']}"
    return label + (" swap" if cfg["swap_ab"] else "")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    copy = result.get("copy_tb_per_s")
    lines = [f"# Skinny GEMM sweep on {result['device']} ({result['date']})", "",
             f"bf16, {CALLS_PER_GRAPH} calls per CUDA graph, weights "
             f"{'one copy (L2-warm)' if result['same_weight'] else 'rotated through copies > 3x L2'}; "
             f"copy bandwidth {copy:.2f} TB/s; {result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget."
             if copy else f"{result['device']}: correctness only (no timings).", "",
             "| matmul | M | N x K | cuBLAS us | cuBLAS bw | Triton best us | Triton bw | speed-up | default us "
             "| best config | configs ok / tried / skipped | max rel err |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for c in result["cells"]:
        base, best, default = c.get("cublas") or {}, c.get("best") or {}, c.get("default") or {}
        num_ok = sum("error" not in r for r in c["configs"])
        errs = [r["max_rel_err"] for r in c["configs"] if "max_rel_err" in r]
        lines.append(
            f"| {c['matmul']} | {c['rows']} | {c['n']} x {c['k']} | {_fmt(base.get('us'), '.1f')} | "
            f"{_fmt(base.get('share_of_copy_bw'), '.0%')} | {_fmt(best.get('us'), '.1f')} | "
            f"{_fmt(best.get('share_of_copy_bw'), '.0%')} | {_fmt(c.get('speedup'), '.2f')} | "
            f"{_fmt(default.get('us'), '.1f')} | {_config_label(best['config']) if best else '-'} | "
            f"{num_ok} / {len(c['configs'])} / {c['configs_skipped']} | {_fmt(max(errs) if errs else None, '.1e')} |")
    failures = [(c["matmul"], c["rows"], r["error"]) for c in result["cells"] for r in c["configs"] if "error" in r]
    if failures:
        lines += ["", f"{len(failures)} config(s) failed; first ones:", ""]
        lines += [f"- {name} M={rows}: {error}" for name, rows, error in failures[:8]]
    lines += ["", "Config: m/n/k = BLOCK_M/N/K, s = num_stages, w = num_warps, swap = w_tile @ x_tile.T. "
              "Bandwidth: weight bytes / time as a share of the "
              "copy bandwidth. The fused down row's cuBLAS column is fused.silu_mul + F.linear; a residual "
              "row's is F.linear + add_ into the fp32 residual, against the Triton epilogue in place."]
    return "\n".join(lines) + "\n"


# --- Main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="skinny-gemm-out", help="directory for the JSON and markdown results")
    parser.add_argument("--quick", action="store_true",
                        help=f"M in {QUICK_ROWS}, {QUICK_CONFIGS_PER_CELL} configs a cell")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 3 configs, correctness only on CPU")
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget of the whole run (s)")
    parser.add_argument("--same-weight", action="store_true", help="every call reads one weight (L2-warm)")
    parser.add_argument("--compile-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                        help="processes that compile the configs first (0: compile while sweeping)")
    parser.add_argument("--rows", default=None, help="comma-separated M values (overrides the defaults)")
    parser.add_argument("--only", default=None, help="comma-separated matmul names, e.g. 'o,down'")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if not args.tiny:
            raise SystemExit("sweep_skinny_gemm.py times kernels on a CUDA GPU; on CPU run it with --tiny "
                             "(TRITON_INTERPRET=1) as a smoke check of the script.")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        from kernels.interpreter import fix_scalar_index

        fix_scalar_index()
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    import bench_engine as bench

    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.only:
        shapes = tuple(s for s in shapes if s.name in args.only.split(","))
    rows = TINY_ROWS if args.tiny else QUICK_ROWS if args.quick else ROWS
    if args.rows:
        rows = tuple(int(r) for r in args.rows.split(","))
    max_configs = QUICK_CONFIGS_PER_CELL if args.quick else MAX_CONFIGS_PER_CELL
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu-interpreter"
    result = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "budget_s": args.budget_s, "same_weight": args.same_weight, "quick": args.quick, "tiny": args.tiny,
              "calls_per_graph": CALLS_PER_GRAPH, "cells": []}
    if on_gpu:
        import triton

        result["triton"] = triton.__version__
        result.update(bench.device_ceilings(device, args.tiny))
        log(f"copy bandwidth {result['copy_tb_per_s']:.2f} TB/s")
    setup = Setup(device, on_gpu, args.same_weight, result.get("copy_tb_per_s"), start + args.budget_s)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        (out_dir / f"skinny_gemm_{slug}.json").write_text(json.dumps(result, indent=1))

    def left_s() -> float:
        return setup.deadline - time.perf_counter()

    plain = [(shape, m, False, candidate_configs(m, shape, num_sms, max_configs, args.tiny))
             for shape in shapes for m in rows]
    residual_keys = [(shape, m) for shape in shapes if shape.has_residual_variant for m in rows]
    if on_gpu:
        jobs = [_job(shape, m, False, cfg) for shape, m, _, configs in plain for cfg in configs]
        result["precompile"] = precompile(jobs, args.compile_workers, 0.5 * left_s(), log)
    # A residual cell times RESIDUAL_TOP_CONFIGS configs: it is kept a fraction of a plain cell's share.
    run_cells(plain, setup, result, save, log, cells_after=len(residual_keys) * RESIDUAL_TOP_CONFIGS / max_configs)
    by_key = {(c["matmul"], c["rows"]): c for c in result["cells"]}
    residual = [(shape, m, True, best_configs(by_key[shape.name, m], RESIDUAL_TOP_CONFIGS))
                for shape, m in residual_keys]
    if on_gpu and residual:
        jobs = [_job(shape, m, True, cfg) for shape, m, _, configs in residual for cfg in configs]
        result["precompile_residual"] = precompile(jobs, args.compile_workers, 0.3 * left_s(), log)
    run_cells(residual, setup, result, save, log)
    save()
    table = markdown(result)
    (out_dir / f"skinny_gemm_{slug}.md").write_text(table)
    print(table)
    bad = [r for c in result["cells"] for r in c["configs"]
           if "max_rel_err" in r and not r["max_rel_err"] <= MAX_REL_ERR]
    if bad:
        raise SystemExit(f"{len(bad)} config(s) disagree with cuBLAS beyond {MAX_REL_ERR}")


if __name__ == "__main__":
    main()
