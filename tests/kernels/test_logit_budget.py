"""The fused logit budget returns the float64 softmax's argmax and max probability."""

from __future__ import annotations

import pytest
import torch

from dilaserve.generation.unmasking import choose_tokens
from kernels.logit_budget import logit_budget, logit_budget_reference


def exact(hidden: torch.Tensor, weight: torch.Tensor, exclude: int | None):
    logits = hidden.double() @ weight.double().T
    if exclude is not None:
        logits[:, exclude] = -torch.inf
    probs = logits.softmax(-1)
    top2 = logits.topk(2, dim=-1).values
    return probs.max(-1), top2[:, 0] - top2[:, 1]


def check(token, prob, hidden, weight, exclude, prob_tol):
    (ref_prob, ref_token), gap = exact(hidden, weight, exclude)
    clear = gap > 1e-3  # rows without a near-tie must agree exactly
    assert torch.equal(token.cpu()[clear.cpu()], ref_token.cpu()[clear.cpu()])
    assert float(((prob.double() - ref_prob).abs() / ref_prob).max()) <= prob_tol
    if exclude is not None:
        assert not (token == exclude).any()


CASES = [
    # rows, vocab, hidden, dtype, excluded token
    pytest.param(5, 333, 48, torch.float32, 7, id="fp32-odd"),
    pytest.param(17, 700, 64, torch.bfloat16, None, id="bf16-17rows"),
    pytest.param(1, 77, 16, torch.float16, 76, id="fp16-1row-last-excluded"),
    pytest.param(40, 515, 40, torch.bfloat16, 3, id="bf16-40rows"),
]


@pytest.mark.parametrize("rows, vocab, hidden_size, dtype, exclude", CASES)
def test_kernel_and_reference_match_float64_softmax(rows, vocab, hidden_size, dtype, exclude, device):
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device, dtype)
    weight = (0.5 * torch.randn(vocab, hidden_size, generator=gen)).to(device, dtype)
    token, prob = logit_budget(hidden, weight, exclude)
    assert token.dtype == torch.long and prob.dtype == torch.float32
    check(token, prob, hidden, weight, exclude, prob_tol=1e-4)
    ref_token, ref_prob = logit_budget_reference(hidden, weight, exclude, vocab_chunk=64)
    check(ref_token, ref_prob, hidden, weight, exclude, prob_tol=1e-4)


def test_ties_take_the_lowest_index_across_tiles_and_splits(device):
    """Equal maxima (duplicate LM-head rows far apart) resolve as torch.argmax does."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 32, generator=gen)
    weight = 0.1 * torch.randn(900, 32, generator=gen)
    weight[850] = weight[123] = hidden[0] * 2  # row 0's best is duplicated
    token, prob = logit_budget(hidden.to(device), weight.to(device))
    assert int(token[0]) == 123
    ref_token, _ = logit_budget_reference(hidden, weight, vocab_chunk=100)
    assert int(ref_token[0]) == 123
    assert int((hidden[:1] @ weight.T).argmax()) == 123


def test_matches_the_engines_greedy_choice(device):
    """What the runner's greedy rows get from choose_tokens, mask token excluded."""
    pytest.importorskip("triton")
    from dilaserve.engine.gpu.logits import greedy_choices

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 32, generator=gen)
    weight = torch.randn(300, 32, generator=gen)
    mask_id = int((hidden @ weight.T).argmax(-1)[0])  # the mask token would win row 0
    logits = (hidden @ weight.T).float()
    logits[:, mask_id] = -torch.inf
    ref_tokens, ref_conf = choose_tokens(logits, 0.0, "low_confidence", None)
    tokens, conf = greedy_choices(hidden.to(device), weight.to(device), mask_id)
    assert conf.dtype == torch.float64
    assert torch.equal(tokens.cpu(), ref_tokens)
    assert float(((conf.cpu() - ref_conf).abs() / ref_conf).max()) <= 1e-5


def test_empty_rows(device):
    token, prob = logit_budget(torch.zeros(0, 16, device=device), torch.randn(50, 16, device=device))
    assert token.shape == (0,) and prob.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_llada_head_on_gpu_without_vocab_sized_buffers(rows):
    """LLaDA-8B's head (126464 x 4096, bf16): right answers, and peak extra memory far below
    one [rows, vocab] float32 tensor."""
    vocab, hidden_size, mask_id = 126464, 4096, 126336
    gen = torch.Generator(device="cuda").manual_seed(rows)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device="cuda") / 64).bfloat16()
    hidden = torch.randn(rows, hidden_size, generator=gen, device="cuda").bfloat16()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    token, prob = logit_budget(hidden, weight, mask_id)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < rows * vocab * 4 / 8 + 2**20
    ref_token, ref_prob = logit_budget_reference(hidden, weight, mask_id)
    assert float(((prob - ref_prob).abs() / ref_prob).max()) <= 1e-4
    logits = hidden.float() @ weight.float().T
    logits[:, mask_id] = -torch.inf
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(token[clear], ref_token[clear])
