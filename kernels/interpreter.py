"""Whether the kernels run in Triton's CPU interpreter."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``). Its dot products are wrong
    for bfloat16 operands (Triton 3.6), so kernels then multiply in float32: the interpreter
    checks indexing and the online reductions; the bf16 tensor-core path is checked on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fix_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar argument into a loop bound with ``int(array)``,
    which NumPy >= 2.4 refuses for its 1-element arrays; make it take the element instead.
    Idempotent; for CPU runs under ``TRITON_INTERPRET=1`` (the tests' conftest, the sweeps'
    CPU modes)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_dilaserve_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dilaserve_fixed = True
    interpreter._patch_lang_tensor = patched
