"""Packed projections for the GPU fast path: a block's q | k | v and gate | up as one matmul each.

At a few dozen rows a step's matmuls read weights, and a 4096 x 4096 projection is too small to
keep a GPU's memory busy: on an H200 the LLaDA-8B shape's q, k, v and o matmuls ran at ~57% of
copy bandwidth, its 12288-wide ones at ~86% (``scripts/profile_step.py``). One matmul over the
concatenated weight reads the same bytes at the wider shape's rate, with one launch.

``pack_projections(model)`` concatenates each group's weights (and biases) into one tensor and
makes every member's parameter a view of its rows, so memory does not grow and a later in-place
load (``load_state_dict``) still reaches the packed tensor. ``packed(q_proj, k_proj, v_proj)``
returns the group's ``PackedProjection`` when exactly those modules were packed together, else
None (the block then runs its separate matmuls). The eager reference path never packs.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

# Per family: the attribute names of each group of projections that read the same input, as
# they sit on one module of the block (LLaDA's block holds all five; Dream's / SDAR's attention
# and MLP modules hold one group each).
GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "llada": (("q_proj", "k_proj", "v_proj"), ("ff_proj", "up_proj")),
    "dream": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
}
GROUPS["sdar"] = GROUPS["dream"]

_PACKS: "weakref.WeakKeyDictionary[nn.Linear, PackedProjection]" = weakref.WeakKeyDictionary()


class PackedProjection:
    """Several linear maps of one input as one matmul; ``__call__`` returns their outputs
    (views of one [N, sum of widths] tensor, last dimension contiguous)."""

    def __init__(self, members: tuple[nn.Linear, ...]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.weight = torch.cat([m.weight.detach() for m in members])
        has_bias = [m.bias is not None for m in members]
        if any(has_bias) and not all(has_bias):
            raise ValueError("packed projections must all have a bias or all have none")
        self.bias = torch.cat([m.bias.detach() for m in members]) if all(has_bias) else None
        self._view_members_in_order()

    def _view_members_in_order(self) -> None:
        """Makes each member's weight (and bias) the view of its rows of the pack, one member's
        rows after another's."""
        offset = 0
        for m, size in zip(self.members, self.sizes):
            m.weight = nn.Parameter(self.weight[offset:offset + size], requires_grad=False)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[offset:offset + size], requires_grad=False)
            offset += size
        self._pointers = [m.weight.data_ptr() for m in self.members]
        # 0: members' rows one after another; 1: a pair interleaved row by row (``interleave``)
        self.group = 0

    def can_interleave(self) -> bool:
        return len(self.members) == 2 and self.sizes[0] == self.sizes[1] and self.bias is None

    def interleave(self) -> None:
        """Reorders a pair of equal widths (gate | up) in place so row 2j is the first member's
        row j and row 2j + 1 the second's, as ``kernels.swiglu_gemm`` reads it with one dot per
        step (``group=1``); the members' weights become views of stride 2 rows into it, so an
        in-place load still reaches the pack. The products come out interleaved too, and
        ``__call__`` returns them as stride-2 column views."""
        if self.group == 1:
            return
        if not self.can_interleave():
            raise ValueError("only a pair of bias-free projections of one width can be interleaved")
        from kernels.swiglu_gemm import interleave_gate_up  # the row order the kernel reads

        w = self.weight
        w.copy_(interleave_gate_up(w, 1))
        for i, m in enumerate(self.members):
            m.weight = nn.Parameter(w[i::2], requires_grad=False)
        self._pointers = [m.weight.data_ptr() for m in self.members]
        self.group = 1

    def restore_order(self) -> None:
        """Undoes ``interleave``: the members' rows one after another again (views of contiguous
        rows), for block ops that read gate | up in order."""
        if self.group == 0:
            return
        self.weight.copy_(torch.cat((self.weight[0::2], self.weight[1::2])))
        self._view_members_in_order()

    def is_current(self) -> bool:
        """False once a member's weight was replaced (not copied into): the pack is stale."""
        return all(m.weight.data_ptr() == p for m, p in zip(self.members, self._pointers))

    def __call__(self, x: torch.Tensor, linear=None) -> tuple[torch.Tensor, ...]:
        """``linear(x, weight)``: the matmul to use for a pack without bias (default F.linear)."""
        if linear is None or self.bias is not None:
            out = F.linear(x, self.weight, self.bias)
        else:
            out = linear(x, self.weight)
        if self.group == 1:
            return out[..., 0::2], out[..., 1::2]
        return out.split(self.sizes, dim=-1)


def pack_projections(model: nn.Module, interleave_pairs: bool = False) -> int:
    """Packs every projection group of ``model`` (see ``GROUPS``) in place; returns the number
    of groups packed. With ``interleave_pairs``, two-member groups of one width and no bias
    (gate | up) are interleaved row by row (``PackedProjection.interleave``), packed now or
    before; other groups stay as they are. Without it, packs interleaved before are put back in
    order, so the layout always follows the block ops that will read it (two engines built one
    after the other on one model, say). Calling it again changes nothing else."""
    groups = GROUPS.get(model.spec.model_type.lower(), ())
    count = 0
    for module in model.modules():
        for names in groups:
            members = tuple(getattr(module, n, None) for n in names)
            if not all(isinstance(m, nn.Linear) for m in members):
                continue
            pack = packed(*members)
            if pack is None:
                pack = PackedProjection(members)
                for m in members:
                    _PACKS[m] = pack
            if interleave_pairs and pack.can_interleave():
                pack.interleave()
            elif not interleave_pairs:
                pack.restore_order()
            count += 1
    return count


def packed(*members: nn.Linear) -> PackedProjection | None:
    """The pack holding exactly ``members`` (in this order) with their current weights, or None."""
    pack = _PACKS.get(members[0])
    if pack is None or len(pack.members) != len(members) or any(a is not b for a, b in zip(pack.members, members)):
        return None
    return pack if pack.is_current() else None
