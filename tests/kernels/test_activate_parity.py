"""The activation-producing path (`triton_update.activate_update`): the kernel computes the MLP's
activation function from its pre-activations, hands the model the result, and leaves the state
exactly as the reference leaves it when fed that same result. Fresh random inputs each run."""

from __future__ import annotations

import random

import pytest
import torch

from engine.fuse import torch_activation
from kernels import reference as ref
from kernels import triton_update as tu
from tests.kernels.test_update_parity import assert_states_equal, clone_state


@pytest.fixture
def seed():
    return random.SystemRandom().randrange(2**31)


def assert_activations_close(y: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, msg: str) -> None:
    """The kernel evaluates in float32 and rounds once; tanh comes from exp, erf from libdevice
    (math.erf in the interpreter), PyTorch's from its own code. Both compute z/2 * (1 + tanh or
    erf) in float32, where the sum cancels in the negative tail: there each side's absolute error
    is a few ulps of 1 times |z| / 2 (times |up| when gated: `scale` = |z| or |z * up|), far
    above the ulp of the tiny result. Bound: 4 * 2^-24 * scale, plus two ulps of a 16-bit output
    (a float32 difference can flip a rounding; the gated kinds round twice, as eager does) or 4
    ulps of a float32 one."""
    fi = torch.finfo(y.dtype)
    rel = 2 * fi.eps if y.dtype != torch.float32 else 4 * 2.0**-23
    y, want = y.float(), want.float()
    # (rel * max(|want|, smallest normal): below it the ulp is that of the subnormals.)
    tol = 4 * 2.0**-24 * scale + rel * want.abs().clamp_min(fi.tiny)
    err = (y - want).abs()
    bad = err > tol
    assert not bool(bad.any()), f"{msg}: error {err[bad][:3].tolist()} above {tol[bad][:3].tolist()}"


CASES = [("gelu_tanh", torch.float32, 0), ("gelu", torch.bfloat16, 1), ("silu_mul", torch.float32, 1),
         ("silu_mul", torch.bfloat16, 0), ("gelu_tanh_mul", torch.float16, 0), ("gelu_tanh", torch.bfloat16, 1)]


@pytest.mark.parametrize("activation,dtype,skip", CASES, ids=[f"{a}-{str(d)[6:]}-skip{s}" for a, d, s in CASES])
def test_activate_update_matches_reference(activation, dtype, skip, seed, device):
    spec = ref.ReductionSpec(excerpt_len=7, top_k=3, negatives=True, random_k=4, quantile_k=2,
                             quantile_prefix=9, hist_bins=6, seed=seed % 1000)
    N = 37
    gen = torch.Generator().manual_seed(seed)
    want = ref.LayerState.empty(spec, N, dtype, device)
    got = clone_state(want)
    sample = ref.RandomSample.empty(spec, device)
    first, seen = 0, []
    for i, B in enumerate([4, 6, 5, 3]):  # the prefix (9 excerpts) ends inside the third batch
        shape = (B, skip + spec.excerpt_len, N)
        pre = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
        up = (torch.randn(shape, generator=gen) * 2).to(dtype).to(device) if activation.endswith("_mul") else None
        batch, sample = ref.plan_batch(spec, sample, first, B, device)
        y, f_got = tu.activate_update(got, spec, pre, up, activation, batch, skip=skip)
        msg = f"seed {seed}, {activation}, {dtype}, skip {skip}, batch {i}"
        assert y.shape == pre.shape and y.dtype == dtype, msg
        want_y = torch_activation(activation, pre.cpu(), None if up is None else up.cpu())  # eager PyTorch
        scale = pre.cpu().float().abs() * (1 if up is None else up.cpu().float().abs())
        assert_activations_close(y.cpu(), want_y, scale, msg)
        f_want = ref.update_layer(want, spec, y[:, skip:], batch)
        first += B
        seen.append(y[:, skip:].float().reshape(-1, N).cpu())
        assert not bool(f_got) and not bool(f_want), msg
        assert_states_equal(want, got, torch.cat(seen), msg)


def test_activate_update_flags_nonfinite_after_the_skipped_tokens(device):
    spec = ref.ReductionSpec(excerpt_len=4, top_k=2, negatives=False, random_k=2, quantile_k=0,
                             quantile_prefix=2, hist_bins=4, seed=0)
    state = ref.LayerState.empty(spec, 5, torch.float32, device)
    sample = ref.RandomSample.empty(spec, device)
    pre = torch.randn(3, 5, 5)
    pre[1, 0, 2] = float("nan")  # the skipped (BOS) token: the model sees it, the statistics don't
    batch, sample = ref.plan_batch(spec, sample, 0, 3, device)
    y, flag = tu.activate_update(state, spec, pre.to(device), None, "gelu", batch, skip=1)
    assert not bool(flag) and bool(y[1, 0, 2].isnan())
    pre = torch.randn(3, 5, 5)
    pre[2, 3, 4] = float("inf")
    batch, sample = ref.plan_batch(spec, sample, 3, 3, device)
    _, flag = tu.activate_update(state, spec, pre.to(device), None, "gelu", batch, skip=1)
    assert bool(flag)


def test_activate_update_refuses_bad_arguments(device):
    spec = ref.ReductionSpec(excerpt_len=4, top_k=2, negatives=False, random_k=0, quantile_k=0,
                             quantile_prefix=2, hist_bins=4, seed=0)
    state = ref.LayerState.empty(spec, 5, torch.float32, device)
    batch, _ = ref.plan_batch(spec, ref.RandomSample.empty(spec, device), 0, 2, device)
    pre = torch.randn(2, 4, 5, device=device)
    with pytest.raises(ValueError, match="needs up"):
        tu.activate_update(state, spec, pre, None, "silu_mul", batch)
    with pytest.raises(ValueError, match="takes no up"):
        tu.activate_update(state, spec, pre, pre, "gelu", batch)
    with pytest.raises(ValueError, match="unknown activation"):
        tu.activate_update(state, spec, pre, None, "relu", batch)
