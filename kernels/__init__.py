"""Per-neuron reductions: a plain PyTorch reference and the fused Triton kernels that match it."""

from __future__ import annotations


BACKENDS = ("torch",)
"""Reduction backends that `select_update` knows; the Triton one joins when it lands."""


def select_update(backend: str, device):
    """The function that folds one layer's activations into its state, for `backend`
    ("auto" picks the fastest one available on `device`). Every backend has the signature and
    the results of `kernels.reference.update_layer`."""
    from kernels import reference

    if backend in ("auto", "torch"):
        return reference.update_layer
    raise ValueError(f"unknown backend '{backend}': use auto or {', '.join(BACKENDS)}")
