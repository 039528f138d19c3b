"""Triton kernels, each beside a pure-torch reference computing the same function.

Importing a kernel module needs ``triton`` (compilation is lazy, so importing on a machine
without a GPU is fine); running one needs a CUDA device, or ``TRITON_INTERPRET=1`` set before
``triton`` is first imported (then the kernels run, slowly, on CPU tensors).
"""

