"""Fused block ops (kernels/fused.py) against the eager torch code they replace, at LLaDA-8B shapes.

Shapes: d_model 4096, 32 heads of 128 (32 kv heads), MLP 12288, bf16, for N = 32 tokens (a
batch-1 reuse step: one block window) and N = 8192 (a large refresh). For each op, the eager
torch code of ``dilaserve.models.layers`` and the Triton kernel are timed two ways:

- stream: launched from Python one after another (what an eager forward pays);
- graph: ``--inner`` calls captured in one CUDA graph and replayed (what a graph-replayed reuse
  step pays: no launch overhead, but every kernel still costs its minimum GPU time).

Each time is the median over ``--repeats`` timed runs (torch.cuda.Event, after warm-up) divided
by ``--inner``, in microseconds per call. "block" is all the elementwise work of one
transformer block (two residual adds, two norms, rotary of q and k, SwiGLU's silu * up: eager
~32 kernels, fused 4); the "per step" lines multiply it by the 32 layers. Also reported: CUDA
kernels per call (torch.profiler) and agreement with the eager output (largest |difference|,
share of bit-identical elements).

    python3 scripts/bench_fused.py [--out DIR] [--repeats 20] [--inner 50]
    python3 scripts/bench_fused.py --interpret     # CPU smoke run of the script: tiny shapes

Writes ``fused_<device>_<date>.{json,md}`` under ``--out`` (when given) and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp: int
    num_layers: int


LLADA_8B = Shape("llada-8b", 4096, 32, 32, 128, 12288, 32)
TINY = Shape("tiny", 64, 4, 2, 16, 96, 2)


def make_inputs(shape: Shape, num_tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    from dilaserve.models.layers import rotary_cos_sin

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    d, hd = shape.d_model, shape.head_dim
    positions = torch.arange(512, 512 + num_tokens, device=device)
    cos, sin = rotary_cos_sin(positions, hd, 10000.0)
    cos_table, sin_table = rotary_cos_sin(torch.arange(512 + num_tokens, device=device), hd, 10000.0)
    return {
        "x": randn(num_tokens, d), "attn_out": randn(num_tokens, d), "mlp_out": randn(num_tokens, d),
        "w1": 1 + 0.1 * randn(d), "w2": 1 + 0.1 * randn(d),
        "q": randn(num_tokens, shape.num_heads, hd), "k": randn(num_tokens, shape.num_kv_heads, hd),
        "cos": cos, "sin": sin, "cos_table": cos_table, "sin_table": sin_table, "positions": positions,
        "gate_up": 4 * randn(num_tokens, 2 * shape.mlp),
        "gate": 4 * randn(num_tokens, shape.mlp), "up": randn(num_tokens, shape.mlp),
    }


def eager_rms_norm(x, w):
    from dilaserve.models.layers import RMSNorm

    return RMSNorm.forward(_Norm(w), x)


class _Norm:  # RMSNorm's state without nn.Module bookkeeping: its forward is what is timed
    def __init__(self, weight):
        self.weight, self.eps = weight, EPS


def ops(t: dict) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, eager torch, fused kernel): each runs the op once on the prepared inputs."""
    from dilaserve.models.layers import apply_rotary
    from kernels import fused

    def eager_block():  # from the previous block's closing residual add to silu * up
        x = t["x"] + t["mlp_out"]
        h = eager_rms_norm(x, t["w1"])
        q, k = apply_rotary(t["q"], t["cos"], t["sin"]), apply_rotary(t["k"], t["cos"], t["sin"])
        x = x + t["attn_out"]
        h2 = eager_rms_norm(x, t["w2"])
        return h, q, k, x, h2, F.silu(t["gate"]) * t["up"]

    def fused_block():
        h, x = fused.add_rms_norm(t["mlp_out"], t["x"], t["w1"], EPS)
        q, k = fused.rotary(t["q"], t["k"], t["cos"], t["sin"])
        h2, x = fused.add_rms_norm(t["attn_out"], x, t["w2"], EPS)
        return h, q, k, x, h2, fused.silu_mul(t["gate"], t["up"])

    gate, up = t["gate_up"].chunk(2, dim=1)
    return [
        ("rms_norm", lambda: eager_rms_norm(t["x"], t["w1"]), lambda: fused.rms_norm(t["x"], t["w1"], EPS)),
        ("add_rms_norm", lambda: (eager_rms_norm(t["x"] + t["attn_out"], t["w1"]), t["x"] + t["attn_out"]),
         lambda: fused.add_rms_norm(t["x"], t["attn_out"], t["w1"], EPS)),
        ("rotary q+k", lambda: (apply_rotary(t["q"], t["cos"], t["sin"]), apply_rotary(t["k"], t["cos"], t["sin"])),
         lambda: fused.rotary(t["q"], t["k"], t["cos"], t["sin"])),
        ("rotary q+k, positions", lambda: (
            apply_rotary(t["q"], t["cos_table"][t["positions"]], t["sin_table"][t["positions"]]),
            apply_rotary(t["k"], t["cos_table"][t["positions"]], t["sin_table"][t["positions"]])),
         lambda: fused.rotary(t["q"], t["k"], t["cos_table"], t["sin_table"], t["positions"])),
        ("silu_mul(gate, up)", lambda: F.silu(t["gate"]) * t["up"], lambda: fused.silu_mul(t["gate"], t["up"])),
        ("silu_mul(gate_up)", lambda: F.silu(gate) * up, lambda: fused.silu_mul(t["gate_up"])),
        ("block", eager_block, fused_block),
    ]


def flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def agreement(eager_out, fused_out) -> dict:
    diffs, same, total = [], 0, 0
    for a, b in zip(flat(eager_out), flat(fused_out)):
        diffs.append(float((a.float() - b.float()).abs().max()))
        same += int((a == b).sum())
        total += a.numel()
    return {"max_abs_diff": max(diffs), "bit_identical": same / total}


def time_stream(fn, repeats: int, inner: int, device: torch.device) -> float:
    """Median microseconds per call, launched from Python."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - begin) * 1e6 / inner)
    return statistics.median(samples)


def time_graph(fn, repeats: int, inner: int) -> float:
    """Median microseconds per call, ``inner`` calls captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: Triton compiles outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(3):
        graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(samples)


def count_kernels(fn) -> int | None:
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a count is a nicety; the timings stand without it
        return None


def run(shape: Shape, token_counts: list[int], dtype: torch.dtype, device: torch.device,
        repeats: int, inner: int) -> list[dict]:
    rows = []
    for num_tokens in token_counts:
        t = make_inputs(shape, num_tokens, dtype, device)
        for name, eager, fused_fn in ops(t):
            row = {"op": name, "tokens": num_tokens, **agreement(eager(), fused_fn())}
            for label, fn in (("eager", eager), ("fused", fused_fn)):
                row[f"{label}_stream_us"] = time_stream(fn, repeats, inner, device)
                if device.type == "cuda":
                    row[f"{label}_graph_us"] = time_graph(fn, repeats, inner)
                    row[f"{label}_kernels"] = count_kernels(fn)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(result: dict) -> str:
    shape, on_cuda = result["shape"], result["device_type"] == "cuda"
    lines = [f"# Fused block ops vs eager torch ({result['device']}, {result['date']})", "",
             f"`scripts/bench_fused.py{' --interpret' if not on_cuda else ''}`: {shape['name']} shapes "
             f"(d_model {shape['d_model']}, {shape['num_heads']} heads x {shape['head_dim']}, "
             f"{shape['num_kv_heads']} kv heads, MLP {shape['mlp']}), {result['dtype']}; "
             f"microseconds per call, median of {result['repeats']} runs of {result['inner']} calls.", ""]
    if on_cuda:
        lines += ["| op | N | kernels eager / fused | stream: eager / fused us | graph: eager / fused us "
                  "| graph speedup | max abs diff | bit-identical |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| op | N | eager / fused us (interpreter) | max abs diff | bit-identical |",
                  "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        agree = f"{r['max_abs_diff']:.2e} | {r['bit_identical']:.2%}"
        if on_cuda:
            lines.append(f"| {r['op']} | {r['tokens']} | {r['eager_kernels']} / {r['fused_kernels']} "
                         f"| {r['eager_stream_us']:.1f} / {r['fused_stream_us']:.1f} "
                         f"| {r['eager_graph_us']:.1f} / {r['fused_graph_us']:.1f} "
                         f"| {r['eager_graph_us'] / r['fused_graph_us']:.2f}x | {agree} |")
        else:
            lines.append(f"| {r['op']} | {r['tokens']} | {r['eager_stream_us']:.0f} / {r['fused_stream_us']:.0f} "
                         f"| {agree} |")
    if on_cuda:
        lines += ["", "Per step (block row x layers, graph replay):"]
        for r in result["rows"]:
            if r["op"] == "block":
                eager_ms = r["eager_graph_us"] * shape["num_layers"] / 1e3
                fused_ms = r["fused_graph_us"] * shape["num_layers"] / 1e3
                lines.append(f"- N = {r['tokens']}: eager {eager_ms:.3f} ms, fused {fused_ms:.3f} ms "
                             f"(saves {eager_ms - fused_ms:.3f} ms over {shape['num_layers']} layers)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the JSON and markdown results")
    parser.add_argument("--tokens", default="32,8192", help="comma-separated token counts N")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=50, help="calls per timed run (and per captured graph)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU smoke run in Triton's interpreter on tiny shapes (timings meaningless)")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        device, shape, dtype = torch.device("cpu"), TINY, torch.bfloat16
        token_counts, repeats, inner = [3], 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_fused.py times Triton kernels on a CUDA device; none is available here. "
                             "Use --interpret for a CPU smoke run of the script (tiny shapes, no timings).")
        device, shape, dtype = torch.device("cuda"), LLADA_8B, torch.bfloat16
        token_counts, repeats, inner = [int(n) for n in args.tokens.split(",")], args.repeats, args.inner
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    result = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "shape": shape.__dict__, "dtype": str(dtype),
              "repeats": repeats, "inner": inner}
    with torch.no_grad():
        result["rows"] = run(shape, token_counts, dtype, device, repeats, inner)
    md = markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"fused_{name.lower().replace(' ', '_')}_{result['date']}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    main()
