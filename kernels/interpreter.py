"""Whether the kernels run in Triton's CPU interpreter."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``). Its dot products are wrong
    for bfloat16 operands (Triton 3.6), so kernels then multiply in float32: the interpreter
    checks indexing and the online reductions; the bf16 tensor-core path is checked on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
