"""Kernel tests run on CUDA where there is a device, else in Triton's interpreter on CPU.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (``triton.jit`` decides
at decoration time), so it is set here, before any test module imports a kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")


if os.environ.get("TRITON_INTERPRET") == "1":
    from kernels.interpreter import fix_scalar_index

    fix_scalar_index()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
