"""The logit budget: LM head + softmax confidence + argmax without a [rows, vocab] float32 tensor.

The function: for hidden rows h [M, d] and the LM head W [V, d],

    logits = h @ W^T (float32 accumulation; ``exclude_token_id``'s column set to -inf)
    token[m] = argmax_v logits[m, v]            (the lowest index among equal maxima)
    prob[m]  = softmax(logits[m])[token[m]] = 1 / sum_v exp(logits[m, v] - max_v logits[m, v])

which is all a greedy LLaDA step needs (threshold and fixed-steps unmasking rank positions by
``prob`` and commit ``token``).

Kernel: programs tile rows (BLOCK_M) x vocabulary splits. A program walks its split's vocab
tiles (BLOCK_V rows of W), forms each [BLOCK_M, BLOCK_V] logit tile with tl.dot over d in
BLOCK_K steps, and folds it into a running (max, sum of exp, argmax) per row. Per-split partials
[M, num_splits] are then merged by a second small kernel. Programs of one split run next to each
other (rows vary fastest), so a W slice is read from device memory about once and re-served
from L2 to the other row tiles. Memory: three [M, num_splits] partials; no logits tensor.

Precision: logits are float32 accumulations of the bf16 products and are never rounded to
bf16; the softmax statistics are float32. The engine's torch path rounds logits to the
model's dtype (the matmul's output), upcasts, and takes the softmax in float64. Hence:
confidences agree to about 1e-6 relative with a float64 softmax of the same float32 logits,
and to bf16 rounding of the logits (~4e-3 relative per logit) with the torch path; argmax can
differ from the torch path only where two logits lie within bf16 rounding of each other (the
torch path then picks the lower index among bf16-equal values; this kernel the larger fp32 value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.interpreter import interpreting



@triton.jit(do_not_specialize=["num_rows", "exclude_token_id", "tiles_per_split", "num_splits"])
def _logit_budget_partial_kernel(
    h_ptr, w_ptr, part_max_ptr, part_sum_ptr, part_arg_ptr,
    num_rows, vocab_size, hidden_size, stride_hm, stride_wv, exclude_token_id, tiles_per_split, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm

    run_max = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: exp2 of (-inf) - (-inf) would be NaN
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_arg = tl.zeros([BLOCK_M], tl.int32)
    num_tiles = tl.cdiv(vocab_size, BLOCK_V)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden_size
            h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if F32_DOT:
                acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        valid = col_ok & (cols != exclude_token_id)
        logits = tl.where(valid[None, :], acc, float("-inf"))
        tile_max = tl.max(logits, 1)
        tile_arg = tl.argmax(logits, 1, tie_break_left=True).to(tl.int32)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp2((run_max - new_max) * 1.4426950408889634) + tl.sum(
            tl.exp2((logits - new_max[:, None]) * 1.4426950408889634), 1)
        run_arg = tl.where(tile_max > run_max, tile * BLOCK_V + tile_arg, run_arg)
        run_max = new_max

    out = rows.to(tl.int64) * num_splits + split
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_arg_ptr + out, run_arg, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "num_splits"])
def _logit_budget_merge_kernel(
    part_max_ptr, part_sum_ptr, part_arg_ptr, token_ptr, prob_ptr, num_rows, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    splits = tl.arange(0, BLOCK_S)
    ok = (rows < num_rows)[:, None] & (splits < num_splits)[None, :]
    at = rows.to(tl.int64)[:, None] * num_splits + splits[None, :]
    part_max = tl.load(part_max_ptr + at, mask=ok, other=-1.0e30)
    part_sum = tl.load(part_sum_ptr + at, mask=ok, other=0.0)
    part_arg = tl.load(part_arg_ptr + at, mask=ok, other=0)
    best = tl.max(part_max, 1)
    total = tl.sum(part_sum * tl.exp2((part_max - best[:, None]) * 1.4426950408889634), 1)
    # Splits are in vocabulary order: the first split holding the maximum has its lowest index.
    first = tl.argmax(part_max, 1, tie_break_left=True)
    token = tl.sum(tl.where(splits[None, :] == first[:, None], part_arg, 0), 1)
    row_ok = rows < num_rows
    tl.store(token_ptr + rows, token.to(tl.int64), mask=row_ok)
    tl.store(prob_ptr + rows, 1.0 / tl.where(row_ok, total, 1.0), mask=row_ok)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def logit_budget(
    hidden: torch.Tensor, weight: torch.Tensor, exclude_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path. hidden [M, d], weight [V, d] (same dtype; bf16, fp16 or fp32).
    Returns (token [M] int64, prob [M] float32): the argmax of ``hidden @ weight.T`` with
    column ``exclude_token_id`` masked out, and its softmax probability."""
    _check(hidden, weight)
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    token = torch.empty(num_rows, dtype=torch.long, device=hidden.device)
    prob = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    if num_rows == 0:
        return token, prob
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight must be contiguous along d")
    if num_rows <= 16:
        block_m, num_warps = 16, 4
    elif num_rows <= 32:
        block_m, num_warps = 32, 4
    elif num_rows <= 64:
        block_m, num_warps = 64, 4
    else:
        block_m, num_warps = 128, 8
    block_v = 128 if hidden.is_cuda else 32
    block_k = 64 if hidden.is_cuda else 32
    num_tiles = triton.cdiv(vocab_size, block_v)
    row_tiles = triton.cdiv(num_rows, block_m)
    # Enough programs to fill the device about 2 waves deep, each over a contiguous vocab range.
    target_splits = max(1, triton.cdiv(2 * _num_sms(hidden.device), row_tiles))
    tiles_per_split = triton.cdiv(num_tiles, min(num_tiles, target_splits))
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    part_max = torch.empty(num_rows, num_splits, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    part_arg = torch.empty(num_rows, num_splits, dtype=torch.int32, device=hidden.device)
    exclude = -1 if exclude_token_id is None else int(exclude_token_id)
    _logit_budget_partial_kernel[(row_tiles, num_splits)](
        hidden, weight, part_max, part_sum, part_arg,
        num_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0), exclude, tiles_per_split, num_splits,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
        F32_DOT=hidden.dtype == torch.float32 or interpreting(),
        num_warps=num_warps, num_stages=3 if hidden.is_cuda else 1,
    )
    merge_rows = 16
    _logit_budget_merge_kernel[(triton.cdiv(num_rows, merge_rows),)](
        part_max, part_sum, part_arg, token, prob, num_rows, num_splits,
        BLOCK_M=merge_rows, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
    )
    return token, prob


def logit_budget_reference(
    hidden: torch.Tensor, weight: torch.Tensor, exclude_token_id: int | None = None, *, vocab_chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch path of ``logit_budget``: float32 logits one vocabulary chunk at a time,
    folded into a running (max, sum of exp, argmax); never more than [M, vocab_chunk]."""
    _check(hidden, weight)
    h = hidden.float()
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    run_max = torch.full((num_rows,), torch.finfo(torch.float32).min, device=hidden.device)
    run_sum = torch.zeros(num_rows, device=hidden.device)
    run_arg = torch.zeros(num_rows, dtype=torch.long, device=hidden.device)
    for start in range(0, vocab_size, vocab_chunk):
        logits = h @ weight[start:start + vocab_chunk].float().T
        if exclude_token_id is not None and start <= exclude_token_id < start + logits.shape[1]:
            logits[:, exclude_token_id - start] = -torch.inf
        chunk_max, chunk_arg = logits.max(dim=1)
        new_max = torch.maximum(run_max, chunk_max)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
        run_arg = torch.where(chunk_max > run_max, chunk_arg + start, run_arg)
        run_max = new_max
    return run_arg, 1.0 / run_sum


def _check(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [M, d] and weight [V, d] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
