"""Per-neuron reductions: a plain PyTorch reference and the fused Triton kernels that match it."""

from __future__ import annotations

import os

BACKENDS = ("torch", "triton")
"""Reduction backends that `select_update` knows ("auto" picks one of them)."""


def triton_status(device) -> str | None:
    """None if the Triton backend can run on `device`, else why not (one line, with the fix)."""
    import torch

    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton backend needs the triton package (pip install triton); use --backend torch"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the triton backend runs on CUDA GPUs, not on '{device}'; set TRITON_INTERPRET=1 to run "
            "it (slowly) through Triton's interpreter, or use --backend torch")


def select_update(backend: str, device, in_graph: bool = False):
    """The function that folds one layer's activations into its state, for `backend`
    ("auto": triton on CUDA, torch elsewhere). Every backend has the signature and the results of
    `kernels.reference.update_layer`.

    With `in_graph`, the function for a `torch.compile`d forward pass instead: it holds no host
    integer that changes per batch, so the graph compiles once. The caller adds each batch's
    tokens to `state.count` after the forward pass and runs a batch with `completes_prefix`
    through the plain function. Returns None where the backend cannot run inside a graph (the
    torch reference: call the plain function outside the graph)."""
    import torch

    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_status(device) is None else "torch"
    if backend == "torch":
        if in_graph:
            return None
        from kernels import reference

        return reference.update_layer
    if backend == "triton":
        why = triton_status(device)
        if why:
            raise ValueError(why)
        from kernels import triton_update

        if device.type != "cuda" and not triton_update.INTERPRET:
            raise ValueError("the Triton kernels were loaded without TRITON_INTERPRET=1; set it before "
                             "the program starts, or use --backend torch")
        return triton_update.update_layer_in_graph if in_graph else triton_update.update_layer
    raise ValueError(f"unknown backend '{backend}': use auto, {', '.join(BACKENDS)}")
