"""The kernel tests run Triton's CPU interpreter (set before anything imports triton), or, with
NEURONATLAS_KERNEL_DEVICE=cuda, the compiled kernels on a GPU:

    NEURONATLAS_KERNEL_DEVICE=cuda python -m pytest -q tests/kernels
"""

import os

import pytest

from tests.kernels.kdevice import DEVICE

if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    """Where the kernel tests put their tensors and recordings."""
    import torch

    return torch.device(DEVICE)


def _fast_nested_calls() -> None:
    """Make nested @jit calls cheap in the interpreter, without changing what they compute.

    Triton 3.x's interpreter re-patches the whole language (inspect.getmembers over tl, tl.core,
    tl.math, ...) on every call of a nested @jit function, and tl.max / tl.sum / tl.where-free
    reductions are such functions: about 85% of a reduction's cost. Within one kernel launch the
    nested patches are never undone, so re-applying them for a function whose globals were
    already patched in that launch is a no-op; this skips it, and forgets at each launch's end.
    On another Triton version whose internals differ this does nothing."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if not all(hasattr(ti, n) for n in ("_patch_lang", "GridExecutor", "_LangPatchScope")):
        return
    original = ti._patch_lang
    done: set[int] = set()

    def patch_once(fn):
        key = id(fn.__globals__)
        if key in done:
            return ti._LangPatchScope()
        done.add(key)
        return original(fn)

    run = ti.GridExecutor.__call__

    def call(self, *args, **kwargs):
        done.clear()
        try:
            return run(self, *args, **kwargs)
        finally:
            done.clear()

    ti._patch_lang = patch_once
    ti.GridExecutor.__call__ = call


_fast_nested_calls()
