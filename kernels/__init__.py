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


_checked: dict[str, str | None] = {}


def triton_self_check(device) -> str | None:
    """Run the Triton update beside the reference on a few small random batches on `device`.
    None if every state field agrees (moments to rounding), else what went wrong, in one line.
    `auto` uses it so that a Triton or driver version that miscompiles the kernels costs speed,
    not correctness."""
    import torch

    from kernels import reference as ref

    key = str(device)
    if key in _checked:
        return _checked[key]
    try:
        from kernels import triton_update

        spec = ref.ReductionSpec(excerpt_len=9, top_k=4, negatives=True, random_k=3, quantile_k=2,
                                 quantile_prefix=7, hist_bins=5, seed=1)
        gen = torch.Generator().manual_seed(0)
        a = ref.LayerState.empty(spec, 37, torch.float32, device)
        b = ref.LayerState.empty(spec, 37, torch.float32, device)
        sample = ref.RandomSample.empty(spec, device)
        for k in range(3):
            batch, sample = ref.plan_batch(spec, sample, 5 * k, 5, device)
            acts = torch.randn(5, 9, 37, generator=gen).to(device)
            ref.update_layer(a, spec, acts, batch)
            triton_update.update_layer(b, spec, acts, batch)
        problem = None
        for name in vars(a):
            if name in ref.SLOT_FIELDS:  # where rows lie in their pools may differ; `ordered` reads them
                continue
            x, y = a.ordered(name), b.ordered(name)
            if not isinstance(x, torch.Tensor):
                same = x == y
            elif name == "moments":
                # (mean, M2, M3, M4) within 1e-4 of their natural scale (sd, n sd^2, n sd^3,
                # n sd^4). On these inputs float32 rounding reached 4e-6 of it (M4, through the
                # interpreter, six seeds); a wrong kernel is off by the order of the scale itself.
                n = max(a.count, 1)
                sd = (x[:, 1] / n).clamp_min(0).sqrt()
                scale = torch.stack([sd, n * sd**2, n * sd**3, n * sd**4], 1) + 1e-12
                same = bool(((x.cpu() - y.cpu()).abs() <= 1e-4 * scale.cpu()).all())
            else:
                same = torch.equal(x.cpu(), y.cpu())
            if not same:
                problem = f"the Triton kernels disagree with the reference on {name}"
                break
    except Exception as exc:  # a compile or launch failure: report it, fall back
        problem = f"the Triton kernels failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    _checked[key] = problem
    return problem


def resolve_backend(backend: str, device) -> str:
    """"torch" or "triton" for `backend`: "auto" is triton on CUDA when its kernels pass
    `triton_self_check` there (else torch, with a warning), torch elsewhere."""
    import torch

    device = torch.device(device)
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_status(device) is None:
        problem = triton_self_check(device)
        if problem is None:
            return "triton"
        import sys

        print(f"warning: {problem}; recording with the torch reference instead "
              "(--backend triton forces the kernels)", file=sys.stderr)
    return "torch"


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
    backend = resolve_backend(backend, device)
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
