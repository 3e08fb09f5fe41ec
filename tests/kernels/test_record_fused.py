"""Recording with --fuse-activation: each layer's activation step is replaced by the kernel that
computes and records it in one read. The store equals the reference's recording of the same
activations, the model goes on with values within rounding of eager PyTorch's and is restored
afterwards, and what cannot be fused records through the plain path with a notice."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.recorder import record
from kernels import reference as ref
from kernels import triton_update as tu
from tests.kernels.test_record_triton import ARCH_KW, assert_same_recording, checkpoint_arrays, config
from tests.tiny import corpus_texts, make_tokenizer

def kernel_activation(pre: torch.Tensor, up, activation: str, skip: int) -> torch.Tensor:
    """The activations exactly as the fused kernel computes them (bit for bit): the kernel run on
    a throwaway state."""
    T = pre.shape[1] - skip
    spec = ref.ReductionSpec(excerpt_len=T, top_k=1, negatives=False, random_k=0, quantile_k=0,
                             quantile_prefix=pre.shape[0], hist_bins=1)
    state = ref.LayerState.empty(spec, pre.shape[-1], pre.dtype, pre.device)
    batch, _ = ref.plan_batch(spec, ref.RandomSample.empty(spec, pre.device), 0, pre.shape[0], pre.device)
    y, _ = tu.activate_update(state, spec, pre, up, activation, batch, skip=skip)
    return y


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_fused_recording_equals_reference_on_the_same_activations(arch, tiny_models, corpus_file, tmp_path,
                                                                    monkeypatch):
    """The fused recording equals the torch reference's recording of the model whose activation
    step computes exactly what the kernel computes (so both see the same numbers): the same
    excerpts, activations, samples and histograms, moments to rounding."""
    import engine.recorder as rec
    from engine import fuse

    kw = ARCH_KW.get(arch, {})
    lines = []
    got = record(config(tiny_models[arch], corpus_file, tmp_path / "fused", backend="triton",
                        fuse_activation=True, **kw), log=lines.append)
    assert got.complete and got.excerpts == 38
    want = {"gpt2": "gelu_tanh", "llama": "silu_mul", "neox": "gelu"}[arch]
    assert any(f"computed and recorded in one pass: {want} in" in line for line in lines), lines

    real_load = rec.load_model
    skip = 1 if kw.get("bos") == "yes" else 0

    def load_with_kernel_activation(*a, **k):
        lm = real_load(*a, **k)
        plan, why = fuse.plan_fusion(lm)
        assert plan is not None, why
        fuse.install(plan, lambda i, pre, up, name: kernel_activation(pre, up, name, skip))
        return lm

    monkeypatch.setattr(rec, "load_model", load_with_kernel_activation)
    record(config(tiny_models[arch], corpus_file, tmp_path / "reference", backend="torch", **kw),
           log=lambda *_: None)
    assert_same_recording(tmp_path / "reference", tmp_path / "fused")


def test_fused_activations_stay_close_to_pytorch(tiny_models, corpus_file, tmp_path):
    """What the model goes on with differs from eager PyTorch by rounding only: the recorded top
    activations of the last layer, fused vs plain (relative 1e-4: float32 ulps carried through
    three layers of a random model)."""
    kw = ARCH_KW["llama"]
    record(config(tiny_models["llama"], corpus_file, tmp_path / "plain", backend="torch", **kw), log=lambda *_: None)
    record(config(tiny_models["llama"], corpus_file, tmp_path / "fused", backend="triton", fuse_activation=True,
                  **kw), log=lambda *_: None)
    _, la = checkpoint_arrays(tmp_path / "plain")
    _, lb = checkpoint_arrays(tmp_path / "fused")
    a, b = la[-1][0], lb[-1][0]
    np.testing.assert_allclose(b["amax"], a["amax"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["amin"], a["amin"], rtol=1e-4, atol=1e-5)


def test_model_is_restored_after_a_fused_recording(tiny_models, corpus_file, tmp_path, monkeypatch):
    import engine.recorder as rec

    seen = {}
    real_load = rec.load_model

    def keep(*a, **k):
        seen["lm"] = real_load(*a, **k)
        return seen["lm"]

    monkeypatch.setattr(rec, "load_model", keep)
    record(config(tiny_models["gpt2"], corpus_file, tmp_path / "s", backend="triton", fuse_activation=True),
           log=lambda *_: None)
    assert all("forward" not in m.__dict__ for m in seen["lm"].model.modules())


def test_compiled_fused_recording_equals_eager(tiny_models, corpus_file, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    record(config(tiny_models["gpt2"], corpus_file, tmp_path / "eager", backend="triton", fuse_activation=True,
                  **ARCH_KW["gpt2"]), log=lambda *_: None)
    torch._dynamo.reset()
    counters.clear()
    record(config(tiny_models["gpt2"], corpus_file, tmp_path / "compiled", backend="triton", fuse_activation=True,
                  compile=True, **ARCH_KW["gpt2"]), log=lambda *_: None)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # before and after the quantile prefix, as unfused
    assert_same_recording(tmp_path / "eager", tmp_path / "compiled")


def test_unfusable_model_records_through_the_plain_path(corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = make_tokenizer(corpus_texts(40))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128,
                                                        vocab_size=len(tok), activation_function="relu"))
    model.save_pretrained(tmp_path / "relu")
    tok.save_pretrained(tmp_path / "relu")
    record(config(tmp_path / "relu", corpus_file, tmp_path / "plain", backend="torch"), log=lambda *_: None)
    lines = []
    record(config(tmp_path / "relu", corpus_file, tmp_path / "fused", backend="triton", fuse_activation=True),
           log=lines.append)
    assert any("--fuse-activation: layer 0's activation module ReLU" in line and "separate pass" in line
               for line in lines), lines
    assert_same_recording(tmp_path / "plain", tmp_path / "fused")


def test_fuse_activation_needs_the_triton_backend(tiny_models, corpus_file, tmp_path):
    with pytest.raises(UserError, match="--fuse-activation needs the triton backend"):
        record(config(tiny_models["gpt2"], corpus_file, tmp_path / "s", backend="torch", fuse_activation=True),
               log=lambda *_: None)
    assert not (tmp_path / "s").exists()
