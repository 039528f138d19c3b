"""GPU engine benchmark on an LLaDA-8B-shaped model with random bf16 weights.

The model (d_model 4096, 32 layers, 32 heads, SwiGLU 12288, vocab 126464) is built directly on
the GPU and filled with random weights: no checkpoint is read. A step's cost does not depend on
the weights: the same matrix shapes, the same attention extents, and a fixed-steps schedule
(LLaDA's, 4 tokens per step) that commits the same number of positions whatever the logits say.
The end-of-sequence row of the LM head is zeroed so that no request stops early (its logit is
then 0, never the maximum of 126464 random ones), so every request does the same work.

Sections, each timed and skipped when the time budget (``--budget-s``) would run out:
1. device ceilings: bf16 matmul 8192^3 (random data) and device-to-device copy bandwidth
   (bytes read + bytes written);
2. batch-1 reuse step (block 32 computed and queried, context 512) against the weight-read
   floor (bytes that must be read once / measured copy bandwidth): torch path, Triton path,
   and the Triton path replayed from a CUDA graph;
3. saturated refresh forwards (16 x 512 tokens) in token-forwards/s and model FLOP/s against
   the matmul peak (model FLOPs = 2 x matmul params x tokens + attention 4 x context x d per
   token and layer; no LM head in a refresh forward);
4. end to end through the real Engine: c requests added at once (c = 1, 8, 64, 256), prompt 256,
   256 generated, block 32, fixed steps (4 tokens/step), dual cache, until all finish:
   requests/s, tokens/s, token-forwards/s and their share of the workload's compute bound, on
   the torch path and on the Triton path; timed on a second pass through the same engine, as a
   server that has run a while (the first, cold pass captures the CUDA graphs of its step
   shapes; its time is reported beside; ``--passes 1`` times the cold pass alone).

Writes ``engine_gpu_<device>_<date>.{json,md}`` under ``--out`` and prints the markdown.
``--tiny`` runs every section on a toy model (CPU works) to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from dilaserve.engine.config import EngineConfig
from dilaserve.engine.engine import Engine
from dilaserve.engine.random_model import LLADA_8B, TINY, build_model
from dilaserve.engine.sampling_params import SamplingParams, default_cache
from dilaserve.generation.unmasking import choose_tokens
from dilaserve.models import layers as model_layers
from dilaserve.models import llada as llada_module
from dilaserve.models.llada import LLaDAModel
from dilaserve.models.packing import pack_projections
from dilaserve.models.paged_attention import PagedAttention, PagedKVCache
from dilaserve.models.spec import ModelSpec
from kernels.interpreter import interpreting

# Published reference points (DESIGN.md; measured on one H200).
FAST_DLLM_DUAL_STEP_MS_H200 = 31.6
H200_FLOOR_MS = 3.8


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median of ``reps`` timed calls (device events on CUDA), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- model and FLOP accounting ---------------------------------------------------------------
def matmul_params(spec: ModelSpec) -> int:
    """Weights every token-forward multiplies by (the transformer blocks)."""
    d, f, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    return spec.num_layers * (2 * d * d + 2 * d * kv + 3 * d * f)


def forward_flops(spec: ModelSpec, tokens: int, context: int, logit_rows: int = 0) -> float:
    attention = 4 * context * spec.num_heads * spec.head_dim * spec.num_layers * tokens
    return 2 * matmul_params(spec) * tokens + attention + 2 * spec.vocab_size * spec.hidden_size * logit_rows


def weight_bytes_read(spec: ModelSpec, context: int, element_size: int = 2) -> int:
    """Bytes a reuse step must read at least once: block weights, LM head, the KV of its context."""
    kv = 2 * spec.num_layers * context * spec.num_kv_heads * spec.head_dim
    return element_size * (matmul_params(spec) + spec.vocab_size * spec.hidden_size + kv)


# -- attention layouts for the direct-forward sections ----------------------------------------
def paged_layout(num_requests: int, length: int, query_start: int, query_end: int, page_size: int,
                 device: torch.device):
    """PagedAttention's constructor tensors for ``num_requests`` sequences of ``length`` tokens
    laid out in consecutive pages, computing and querying positions [query_start, query_end)."""
    pages_per_req = -(-length // page_size)
    pos = torch.arange(length)
    key_slots = torch.stack([(r * pages_per_req + pos // page_size) * page_size + pos % page_size
                             for r in range(num_requests)])
    num_q = query_end - query_start
    slot_mapping = key_slots[:, query_start:query_end].reshape(-1)
    query_index = torch.arange(num_requests * num_q).view(num_requests, num_q)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(slot_mapping), to(query_index), to(torch.ones_like(query_index, dtype=torch.bool)),
            to(key_slots), to(torch.ones_like(key_slots, dtype=torch.bool)))


def triton_backend_cls():
    from dilaserve.engine.gpu.attention import TritonPagedAttention

    return TritonPagedAttention


def block_ops():
    """The fast path's fused element-wise kernels (as the engine's runner passes them)."""
    from dilaserve.engine.gpu import fast_block_ops

    return fast_block_ops(torch.device("cuda") if torch.cuda.is_available() else None)


def greedy_torch(model: LLaDAModel, hidden_rows: torch.Tensor):
    """The runner's torch path for greedy rows: logits, mask excluded, float64 softmax."""
    logits = model.compute_logits(hidden_rows).float()
    logits[:, model.spec.mask_token_id] = -torch.inf
    return choose_tokens(logits, 0.0, "low_confidence", None)


def greedy_triton(model: LLaDAModel, hidden_rows: torch.Tensor):
    from dilaserve.engine.gpu.logits import greedy_choices

    return greedy_choices(hidden_rows, model.lm_head_weight(), model.spec.mask_token_id)


@contextlib.contextmanager
def graph_safe_rotary():
    """What the proposed layers.py change does under capture: read the prebuilt rotary table
    without the host sync of ``positions.max()``."""
    original = llada_module.rotary_cos_sin

    def lookup(positions, head_dim, theta):
        table = model_layers._ROTARY_TABLES[(positions.device, head_dim, theta)]
        return table[0][positions], table[1][positions]

    llada_module.rotary_cos_sin = lookup
    try:
        yield
    finally:
        llada_module.rotary_cos_sin = original


# -- sections ---------------------------------------------------------------------------------
def device_ceilings(device: torch.device, tiny: bool) -> dict:
    n = 1024 if tiny else 8192
    gen = torch.Generator(device=device).manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    numel = (2**22 if tiny else 2**30)
    src = torch.randn(numel, device=device, generator=gen).to(dtype)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    moved = 2 * src.numel() * src.element_size()
    del a, b, src, dst
    return {"matmul_n": n, "matmul_tflops": 2 * n**3 / ms / 1e9, "copy_bytes": moved,
            "copy_tb_per_s": moved / copy_ms / 1e9}


@torch.inference_mode()
def batch1_reuse_step(model: LLaDAModel, device: torch.device, paths: list[str], copy_tb_s: float,
                      context: int, block: int, prompt: int) -> dict:
    spec, page_size = model.spec, 16
    dtype = next(model.parameters()).dtype
    cache = PagedKVCache(spec.num_layers, -(-context // page_size), page_size, spec.num_kv_heads, spec.head_dim,
                         dtype, device)
    gen = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(0, spec.mask_token_id, (context,), device=device, generator=gen)
    positions = torch.arange(context, device=device)
    model(ids, positions, PagedAttention(cache, *paged_layout(1, context, 0, context, page_size, device)))
    q_ids, q_pos = ids[prompt:prompt + block], positions[prompt:prompt + block]
    layout = paged_layout(1, context, prompt, prompt + block, page_size, device)
    result = {"context": context, "query_tokens": block, "logit_rows": block}
    for path in paths:
        backend = (triton_backend_cls() if path == "triton" else PagedAttention)(cache, *layout)
        choose = greedy_triton if path == "triton" else greedy_torch
        ops = block_ops() if path == "triton" else None

        def step():
            return choose(model, model(q_ids, q_pos, backend, ops))

        result[f"{path}_eager_ms"] = median_ms(step, device, warmup=3, reps=15)
        if path == "triton" and device.type == "cuda":
            result["triton_graph_ms"] = graphed_ms(step, device)
    floor_bytes = weight_bytes_read(spec, context)
    result["floor_bytes"] = floor_bytes
    result["floor_ms"] = floor_bytes / (copy_tb_s * 1e12) * 1e3
    all_bytes = 2 * spec.num_params()
    result["floor_all_weights_ms"] = all_bytes / (copy_tb_s * 1e12) * 1e3
    return result


def graphed_ms(step, device: torch.device) -> float:
    with graph_safe_rotary():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return median_ms(graph.replay, device, warmup=3, reps=20)


@torch.inference_mode()
def saturated_forward(model: LLaDAModel, device: torch.device, paths: list[str], peak_tflops: float,
                      num_requests: int, length: int) -> dict:
    spec, page_size = model.spec, 16
    dtype = next(model.parameters()).dtype
    cache = PagedKVCache(spec.num_layers, num_requests * -(-length // page_size), page_size, spec.num_kv_heads,
                         spec.head_dim, dtype, device)
    gen = torch.Generator(device=device).manual_seed(3)
    tokens = num_requests * length
    ids = torch.randint(0, spec.mask_token_id, (tokens,), device=device, generator=gen)
    positions = torch.arange(length, device=device).repeat(num_requests)
    layout = paged_layout(num_requests, length, 0, length, page_size, device)
    flops = forward_flops(spec, tokens, length)
    result = {"requests": num_requests, "length": length, "tokens": tokens, "flops_per_forward": flops}
    for path in paths:
        backend = (triton_backend_cls() if path == "triton" else PagedAttention)(cache, *layout)
        ops = block_ops() if path == "triton" else None
        ms = median_ms(lambda: model(ids, positions, backend, ops), device, warmup=1, reps=3)
        result[f"{path}_ms"] = ms
        result[f"{path}_token_forwards_per_s"] = tokens / ms * 1e3
        result[f"{path}_tflops"] = flops / ms / 1e9
        result[f"{path}_share_of_peak"] = flops / ms / 1e9 / peak_tflops
    del cache
    return result


def make_engine(model: LLaDAModel, path: str, num_pages: int, max_batch_tokens: int = 8192,
                max_refresh_tokens: int = 4096) -> tuple[Engine, str]:
    fields = EngineConfig.__dataclass_fields__
    kwargs = dict(num_pages=num_pages, page_size=16, max_running=256, max_batch_tokens=max_batch_tokens,
                  max_refresh_tokens=max_refresh_tokens)
    if "kernels" in fields:  # the runner's kernel hook is in place
        engine = Engine(model, EngineConfig(kernels=path, **kwargs))
        return engine, ("Triton attention + logit budget + fused element-wise kernels, reuse steps from CUDA graphs"
                        if path == "triton" else "pure torch")
    engine = Engine(model, EngineConfig(**kwargs))
    if path == "torch":
        return engine, "reference runner"
    # No hook yet: swap the attention backend only (logits stay on the torch path).
    cls, build = triton_backend_cls(), engine.runner._build

    def build_with_kernel(plan):
        input_ids, positions, attn, q_starts = build(plan)
        return input_ids, positions, cls.from_backend(attn), q_starts

    engine.runner._build = build_with_kernel
    return engine, "attention only (runner hook missing)"


def fixed_steps_logit_rows(max_tokens: int, block: int, tokens_per_step: int) -> int:
    """Queried rows per request: every step of a block queries its still-masked positions."""
    rows = 0
    for start in range(0, max_tokens, block):
        remaining = min(block, max_tokens - start)
        while remaining > 0:
            rows += remaining
            remaining -= tokens_per_step
    return rows


def end_to_end(model: LLaDAModel, path: str, concurrency: int, args, num_pages: int, peak_tflops: float) -> dict:
    """The workload on one engine, twice: a cold pass, then the timed warm pass (as a server
    that has run a while: its CUDA graphs for these step shapes captured, its Triton kernels
    compiled). Both passes' seconds are reported."""
    spec = model.spec
    engine, wiring = make_engine(model, path, num_pages, args.max_batch_tokens, args.max_refresh_tokens)
    steps = args.max_tokens // args.tokens_per_step
    params = SamplingParams(max_tokens=args.max_tokens, block_size=args.block, steps=steps,
                            cache=default_cache(spec.causal_block_size))
    gen = torch.Generator().manual_seed(concurrency)
    prompts = [torch.randint(0, min(spec.mask_token_id, spec.eos_token_id), (args.prompt_len,), generator=gen).tolist()
               for _ in range(concurrency)]

    def run(tag: str) -> tuple[float, int, list, int]:
        for i, prompt in enumerate(prompts):
            engine.add(engine.make_request(f"{tag}{i}", prompt, params))
        sync(model.lm_head_weight().device)
        t0 = time.perf_counter()
        num_steps, finished, max_running = 0, [], 0
        while engine.has_work():
            outputs = engine.step()
            num_steps += 1
            max_running = max(max_running, len(engine.scheduler.running))
            finished.extend(o for o in outputs if o.finished)
        sync(model.lm_head_weight().device)
        return time.perf_counter() - t0, num_steps, finished, max_running

    cold_seconds = run("cold")[0] if args.passes > 1 else None
    seconds, num_steps, finished, max_running = run("r")
    tokens = sum(len(o.token_ids) for o in finished)
    token_forwards = sum(o.counters.num_tokens_computed for o in finished)
    seq_len = args.prompt_len + args.max_tokens
    logit_rows = concurrency * fixed_steps_logit_rows(args.max_tokens, args.block, args.tokens_per_step)
    flops = forward_flops(spec, token_forwards, seq_len) + 2 * spec.vocab_size * spec.hidden_size * logit_rows
    bound_s = flops / (peak_tflops * 1e12)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "path": path, "wiring": wiring, "concurrency": concurrency, "seconds": seconds, "cold_seconds": cold_seconds,
        "engine_steps": num_steps,
        "max_running": max_running, "finished": len(finished),
        "finish_reasons": sorted({o.finish_reason for o in finished}), "tokens": tokens,
        "requests_per_s": len(finished) / seconds, "tokens_per_s": tokens / seconds,
        "token_forwards": token_forwards, "token_forwards_per_s": token_forwards / seconds,
        "logit_rows": logit_rows, "flops": flops, "compute_bound_s": bound_s, "share_of_bound": bound_s / seconds,
        "ms_per_step": seconds / num_steps * 1e3,
    }


# -- report -----------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    c, b1, sat = result.get("ceilings", {}), result.get("batch1", {}), result.get("saturated", {})
    is_h200 = "H200" in result["device"]
    lines = [
        f"# Engine on {result['device']} ({result['date']})", "",
        f"LLaDA-8B-shaped model ({result['model']['params'] / 1e9:.2f}B params, {result['model']['matmul_params'] / 1e9:.2f}B "
        "in the blocks), random bf16 weights built on the GPU; step cost does not depend on the weights "
        "(same shapes; fixed-steps schedule; EOS row zeroed so no request stops early).", "",
        f"torch {result['torch']}, triton {result.get('triton', '-')}. Wall time of the benchmark: {result['elapsed_s']:.0f} s."
        + (f" Errors: {result['errors']}." if result.get("errors") else "")
        + (f" Large-step matmul options: `{result['settings']['variant']}` (matmul.VARIANTS)."
           if result["settings"].get("variant") else ""), "",
        "## Device ceilings", "",
        f"- bf16 matmul {c.get('matmul_n', '-')}^3, random data: **{c.get('matmul_tflops', float('nan')):.0f} TFLOP/s**",
        f"- device copy: **{c.get('copy_tb_per_s', float('nan')):.2f} TB/s** (bytes read + written)", "",
    ]
    after = result.get("ceilings_after")
    if after:
        lines[-1:-1] = [f"- bf16 matmul again after the end-to-end runs: {after['matmul_tflops']:.0f} TFLOP/s "
                        "(shares below divide by the first; \"at the higher peak\" by the larger of the two)"]
    if b1:
        floor = b1["floor_ms"]
        lines += [
            f"## Batch-1 reuse step (block {b1['query_tokens']} computed and queried, context {b1['context']})", "",
            f"Floor: {b1['floor_bytes'] / 1e9:.2f} GB read once (block weights + LM head + KV) / copy bandwidth = "
            f"**{floor:.2f} ms** (all {2 * result['model']['params'] / 1e9:.1f} GB of weights: {b1['floor_all_weights_ms']:.2f} ms). "
            f"H200 reference floor {H200_FLOOR_MS} ms.", "",
            "| path | ms / step | x floor |", "|---|---:|---:|",
        ]
        for key, label in (("torch_eager_ms", "torch (eager)"), ("triton_eager_ms", "Triton kernels + fused element-wise (eager)"),
                           ("triton_graph_ms", "Triton kernels + fused element-wise, CUDA graph")):
            if key in b1:
                lines.append(f"| {label} | {b1[key]:.2f} | {b1[key] / floor:.2f} |")
        lines.append("")
    if sat:
        lines += [
            f"## Saturated refresh forward ({sat['requests']} x {sat['length']} = {sat['tokens']} tokens)", "",
            "| path | ms | token-forwards/s | model TFLOP/s | share of matmul peak |", "|---|---:|---:|---:|---:|",
        ]
        for path in ("torch", "triton"):
            if f"{path}_ms" in sat:
                lines.append(f"| {path} | {sat[f'{path}_ms']:.1f} | {sat[f'{path}_token_forwards_per_s']:.0f} | "
                             f"{sat[f'{path}_tflops']:.0f} | {sat[f'{path}_share_of_peak']:.0%} |")
        lines.append("")
    rows = result.get("end_to_end", [])
    same = result.get("fast_dllm_dual")  # scripts/bench_fast_dllm.py's dual-cache row, same device
    if rows:
        s = result["settings"]
        lines += [
            f"## End to end through the Engine (prompt {s['prompt_len']}, {s['max_tokens']} generated, block {s['block']}, "
            f"fixed steps: {s['tokens_per_step']} tokens/step, dual cache; step budget "
            f"{s.get('max_batch_tokens', 8192)} tokens, of them refresh {s.get('max_refresh_tokens', 4096)}; "
            f"c requests added at once, until all finish; "
            + ("the timed pass is the second on one engine, after a cold pass that captured its CUDA graphs)"
               if s.get("passes", 1) > 1 else "one cold pass per engine: graph captures included)"), "",
            "| path | c | s | cold pass s | requests/s | tokens/s | token-forwards/s | share of compute bound | ms/step "
            "| steps | max running |" + (" x Fast-dLLM dual (126.6 tok/s, H200) |" if is_h200 else "")
            + (f" x Fast-dLLM dual here ({same['tokens_per_s']:.1f} tok/s) |" if same else "")
            + (" share at the higher peak |" if after else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if is_h200 else "")
            + ("---:|" if same else "") + ("---:|" if after else ""),
        ]
        # the same work over the larger of the two measured peaks (never a larger share)
        lower = c["matmul_tflops"] / max(c["matmul_tflops"], after["matmul_tflops"]) if after else 1.0
        fast_dllm_tps = result["settings"]["tokens_per_step"] / (FAST_DLLM_DUAL_STEP_MS_H200 / 1e3)
        for r in rows:
            if r.get("skipped"):
                lines.append(f"| {r['path']} | {r['concurrency']} | skipped ({r['skipped']}) |")
                continue
            lines.append(
                f"| {r['path']} | {r['concurrency']} | {r['seconds']:.1f} | "
                f"{'-' if r.get('cold_seconds') is None else format(r['cold_seconds'], '.1f')} | "
                f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['token_forwards_per_s']:.0f} | {r['share_of_bound']:.0%} | {r['ms_per_step']:.1f} | {r['engine_steps']} | "
                f"{r['max_running']} |" + (f" {r['tokens_per_s'] / fast_dllm_tps:.1f}x |" if is_h200 else "")
                + (f" {r['tokens_per_s'] / same['tokens_per_s']:.1f}x |" if same else "")
                + (f" {r['share_of_bound'] * lower:.0%} |" if after else ""))
        wirings = sorted({f"{r['path']}: {r['wiring']}" for r in rows if not r.get("skipped")})
        if same:
            lines += ["", f"Fast-dLLM here: its published `generate_with_dual_cache` run one request at a time on "
                      f"this device by `scripts/bench_fast_dllm.py` ({same['device']}, {same['date']}): "
                      f"{same['ms_per_forward']:.1f} ms a forward, {same['tokens_per_s']:.1f} tok/s."]
        lines += ["", "Wiring: " + "; ".join(wirings) + ".",
                  "Token-forwards per request: refresh of the whole sequence at each block start + the block "
                  "on each reuse step; compute bound = (2 x block params x token-forwards + attention + LM head "
                  "on queried rows) / measured matmul peak."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting sections after this")
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--paths", default="triton,torch")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--saturation-requests", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=8192,
                        help="the engine's step budget (token-forwards a step; EngineConfig.max_batch_tokens)")
    parser.add_argument("--max-refresh-tokens", type=int, default=4096,
                        help="refresh tokens a step (EngineConfig.max_refresh_tokens): with the budget it sets how "
                             "many requests run at once at saturation")
    parser.add_argument("--reserve-gib", type=float, default=18.0, help="GPU memory kept free of KV pages")
    parser.add_argument("--passes", type=int, default=2, choices=(1, 2),
                        help="2: time the second pass of the workload on one engine (graphs captured in the first)")
    parser.add_argument("--variant", default=None,
                        help="large-step matmul options (dilaserve/engine/gpu/matmul.py VARIANTS; default: the committed)")
    parser.add_argument("--fast-dllm-result", default=None,
                        help="JSON of scripts/bench_fast_dllm.py run on this device: adds the x Fast-dLLM dual column")
    parser.add_argument("--tiny", action="store_true", help="toy model: check the script, not the GPU")
    args = parser.parse_args()
    if args.variant is not None:
        from dilaserve.engine.gpu import matmul

        if args.variant not in matmul.VARIANTS:
            parser.error(f"--variant must be one of {sorted(matmul.VARIANTS)}")
        matmul.OPTIONS = matmul.VARIANTS[args.variant]
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = [p for p in args.paths.split(",") if p]
    if device.type != "cuda" and not interpreting():
        paths = [p for p in paths if p == "torch"]
    shape = TINY if args.tiny else LLADA_8B
    if args.tiny:
        args.prompt_len, args.max_tokens, args.saturation_requests = 16, 32, 2
    result: dict = {
        "benchmark": "bench_engine", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "settings": {**vars(args), "paths": paths},
    }
    with contextlib.suppress(ImportError):
        import triton

        result["triton"] = triton.__version__
    if args.fast_dllm_result is not None:
        fd = json.loads(Path(args.fast_dllm_result).read_text())
        dual = next((r for r in fd.get("rows", []) if r.get("mode") == "dual"), None)
        if dual is None:
            parser.error(f"{args.fast_dllm_result} has no dual-cache row (bench_fast_dllm.py --modes dual)")
        if fd.get("device") != result["device"]:
            parser.error(f"{args.fast_dllm_result} was measured on {fd.get('device')}, this is {result['device']}")
        result["fast_dllm_dual"] = {**dual, "device": fd["device"], "date": fd["date"]}

    def log(msg: str) -> None:
        print(f"[{budget.elapsed():6.1f} s] {msg}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in result["device"].lower()).strip("_")
    stem = out / f"engine_gpu_{slug}_{result['date']}"

    def save() -> str:
        result["elapsed_s"] = budget.elapsed()
        table = markdown(result)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(table)
        return table

    @contextlib.contextmanager
    def section(name: str):
        """A failing section is recorded and the benchmark goes on; results are saved after each."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one device run: keep what the other sections measure
            log(f"{name} failed: {exc!r}")
            traceback.print_exc()
            result.setdefault("errors", {})[name] = repr(exc)
        save()

    result["ceilings"] = c = device_ceilings(device, args.tiny)
    log(f"ceilings: {c['matmul_tflops']:.0f} TFLOP/s, {c['copy_tb_per_s']:.2f} TB/s")
    model = build_model(shape, device)
    if device.type == "cuda":
        # as the engine's runner does on the fast path (the torch path ignores it)
        pack_projections(model, interleave_pairs=block_ops().interleave_gate_up)
    spec = model.spec
    result["model"] = {**shape, "params": spec.num_params(), "matmul_params": matmul_params(spec)}
    log(f"model built: {spec.num_params() / 1e9:.2f}B params")
    context = args.prompt_len + args.max_tokens
    with section("batch1"):
        result["batch1"] = batch1_reuse_step(model, device, paths, c["copy_tb_per_s"], context, args.block,
                                             args.prompt_len)
        log(f"batch-1 reuse step: {json.dumps({k: round(v, 3) for k, v in result['batch1'].items() if k.endswith('ms')})}")
    with section("saturated"):
        result["saturated"] = saturated_forward(model, device, paths, c["matmul_tflops"], args.saturation_requests,
                                                context)
        log("saturated: " + ", ".join(f"{p} {result['saturated'][f'{p}_share_of_peak']:.0%}" for p in paths))

    # KV pages for the largest concurrency (the same pool size on both paths), within memory.
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    page_size = 16
    per_page = PagedKVCache.bytes_per_page(spec.num_layers, page_size, spec.num_kv_heads, spec.head_dim,
                                           next(model.parameters()).dtype)
    wanted = max(concurrencies) * -(-context // page_size) + 8
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        num_pages = min(wanted, int((free - args.reserve_gib * 2**30) // per_page))
    else:
        num_pages = wanted
    result["kv_pages"] = num_pages
    log(f"KV pool: {num_pages} pages of {page_size} tokens ({num_pages * per_page / 2**30:.1f} GiB)")

    # Warm the kernels (compilation) outside the timed runs.
    warm = argparse.Namespace(**{**vars(args), "max_tokens": args.block})
    for path in list(paths):
        with section(f"warm-up {path}"):
            end_to_end(model, path, 2, warm, num_pages, c["matmul_tflops"])
        if f"warm-up {path}" in result.get("errors", {}):
            paths.remove(path)
    log("warm-up done")
    rows, last = [], {}
    result["end_to_end"] = rows
    for conc in concurrencies:
        for path in paths:
            estimate = 0.0
            if path in last:
                prev_c, prev_s = last[path]
                estimate = prev_s * max(1.0, conc / prev_c)
            if not budget.allows(estimate):
                rows.append({"path": path, "concurrency": conc, "skipped": f"~{estimate:.0f} s left out of the budget"})
                log(f"{path} c={conc}: skipped (estimate {estimate:.0f} s)")
                continue
            with section(f"{path} c={conc}"):
                row = end_to_end(model, path, conc, args, num_pages, c["matmul_tflops"])
                rows.append(row)
                last[path] = (conc, row["seconds"])
                log(f"{path} c={conc}: {row['seconds']:.1f} s, {row['tokens_per_s']:.0f} tok/s, "
                    f"{row['share_of_bound']:.0%} of bound, reasons {row['finish_reasons']}")
    # The peak again, on a GPU that has worked for minutes (clocks can differ from the cool start).
    with section("ceilings after"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["ceilings_after"] = after = device_ceilings(device, args.tiny)
        log(f"ceilings after: {after['matmul_tflops']:.0f} TFLOP/s, {after['copy_tb_per_s']:.2f} TB/s")
    print(save())
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
