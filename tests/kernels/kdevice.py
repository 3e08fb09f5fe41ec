"""Where the kernel tests run: Triton's CPU interpreter (default), or the compiled kernels on a GPU
with NEURONATLAS_KERNEL_DEVICE=cuda."""

import os

DEVICE = os.environ.get("NEURONATLAS_KERNEL_DEVICE", "cpu")
