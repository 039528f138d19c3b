"""Peak-memory accounting for one step: activations, attention and logits, predicted from its shape.

Weights and the KV pool are allocated once; what a step adds on top is transient, and it is
what limits batch size on a GPU once KV pages are plentiful. The prediction, in bytes (``b``
bytes per activation element, ``d`` hidden, ``kv`` key/value width, ``f`` MLP width, ``V``
vocabulary, ``T`` tokens computed, ``M`` queried rows, ``R`` requests, ``Q`` / ``L`` the most
tokens / keys of one request):

- forward: the residual stream and one layer's temporaries, whichever of attention or MLP is
  larger: ``T * (b * (2d + max(3d + 2kv, 4f)) + 12d)`` (``12d``: the float32 copies RoPE makes);
  with the fused block kernels (the GPU fast path) RoPE makes no copies, the residual stream is
  float32, the q | k | v and gate | up products are float32 and the MLP runs on at most
  ``C = mlp_chunk_tokens`` tokens at a time: ``(4 + b) d T + max((4 (d + 2kv) + 2bd) T,
  (8 + 2b) f min(T, C))``; with the one-kernel SwiGLU (``fused_mlp``) a slice holds only
  silu x up, ``b f min(T, C)``, except on steps of at most 32 rows (float32 products there);
- attention on the torch reference path, which gathers each request's keys into a padded
  tensor and forms scores: ``R * (2 * L * H * D * b + Q * H * D * b + H * Q * L * 4)``; the
  Triton kernel reads the pages in place (0);
- logits, after the forward (only the hidden rows of queried positions survive it):
  without the logit budget's fused kernel, ``M * V * (b + 4 + 8 + 8)`` (the LM head's output,
  its float32 copy, and the float64 softmax input and output); with it, ``M`` rows of running
  (max, sum, argmax) per vocabulary split: ``M * splits * 12``.

Peak = max(forward + attention, ``T * d * b`` + logits). The scheduler keeps a step's peak
under ``EngineConfig.step_memory_gib`` (``MemoryTally``). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepMemoryModel:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 4  # activation element size: 2 for bf16, 4 for float32
    fused_logits: bool = False  # the logit budget's fused kernel (no [rows, vocab] tensor)
    padded_attention: bool = True  # the torch reference attention (gathers keys, forms scores)
    logit_splits: int = 64  # vocabulary splits of the fused kernel
    fused_block: bool = False  # the fused block kernels (layers.BlockOps): float32 stream, MLP slices, no RoPE copies
    mlp_chunk_tokens: int = 2048  # layers.MLP_CHUNK_TOKENS (BlockOps.mlp_chunk_tokens)
    fused_mlp: bool = False  # BlockOps.linear_swiglu: gate | up and silu x up in one kernel above 32 rows

    @classmethod
    def for_spec(cls, spec, dtype_bytes: int = 4, fused_logits: bool = False,
                 padded_attention: bool = True, block_ops=None) -> "StepMemoryModel":
        """``block_ops``: the fast path's ``BlockOps`` (None: the eager block), whose MLP slice size
        and kernel the fused block's forward is priced with."""
        extra = {} if block_ops is None else {"fused_block": True, "mlp_chunk_tokens": block_ops.mlp_chunk_tokens,
                                              "fused_mlp": block_ops.linear_swiglu is not None}
        return cls(spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                   spec.vocab_size, dtype_bytes, fused_logits, padded_attention, **extra)

    def forward_bytes(self, tokens: int) -> int:
        d, kv, f, b = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size, self.dtype_bytes
        if self.fused_block:
            rows = min(tokens, self.mlp_chunk_tokens)
            mlp = (max(b * f * rows, (8 + 2 * b) * f * min(rows, 32)) if self.fused_mlp
                   else (8 + 2 * b) * f * rows)
            return (4 + b) * d * tokens + max((4 * (d + 2 * kv) + 2 * b * d) * tokens, mlp)
        return tokens * (b * (2 * d + max(3 * d + 2 * kv, 4 * f)) + 12 * d)

    def attention_bytes(self, num_requests: int, max_tokens: int, max_keys: int) -> int:
        if not self.padded_attention:
            return 0
        h, hd, b = self.num_heads, self.head_dim, self.dtype_bytes
        return num_requests * (2 * max_keys * h * hd * b + max_tokens * h * hd * b + h * max_tokens * max_keys * 4)

    def logit_bytes(self, rows: int, fused: bool | None = None) -> int:
        fused = self.fused_logits if fused is None else fused
        if fused:
            return rows * self.logit_splits * 12
        return rows * self.vocab_size * (self.dtype_bytes + 4 + 8 + 8)

    def step_bytes(self, tokens: int, rows: int, num_requests: int, max_tokens: int, max_keys: int) -> int:
        forward = self.forward_bytes(tokens) + self.attention_bytes(num_requests, max_tokens, max_keys)
        head = tokens * self.hidden_size * self.dtype_bytes + self.logit_bytes(rows)
        return max(forward, head)


class MemoryTally:
    """A step's running shape as the scheduler fills it, checked against a byte budget."""

    def __init__(self, model: StepMemoryModel, budget_bytes: float):
        self.model = model
        self.budget_bytes = budget_bytes
        self.tokens = self.rows = self.num_requests = self.max_tokens = self.max_keys = 0

    def _with(self, item) -> tuple[int, int, int, int, int]:
        return (self.tokens + item.num_tokens, self.rows + len(item.query_positions), self.num_requests + 1,
                max(self.max_tokens, item.num_tokens), max(self.max_keys, item.num_context_tokens))

    def bytes_with(self, item) -> int:
        return self.model.step_bytes(*self._with(item))

    def fits(self, item) -> bool:
        """Whether the step stays within budget with ``item`` (the first item always fits: a
        request too large for the budget alone still runs, by itself)."""
        return self.num_requests == 0 or self.bytes_with(item) <= self.budget_bytes

    def add(self, item) -> None:
        self.tokens, self.rows, self.num_requests, self.max_tokens, self.max_keys = self._with(item)

    @property
    def bytes(self) -> int:
        return self.model.step_bytes(self.tokens, self.rows, self.num_requests, self.max_tokens, self.max_keys)
