"""A whole recording with the Triton backend equals one with the PyTorch reference."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import store as st
from engine.cli import main
from engine.errors import UserError
from engine.recorder import RecordConfig, record
from tests.kernels.kdevice import DEVICE

ROOT = Path(__file__).resolve().parents[2]
T = 12


def config(model, corpus, out, **kw) -> RecordConfig:
    # 38 excerpts in batches of 8: the prefix (10 = a quarter of the corpus) ends inside the
    # second batch, and the last batch is short.
    base = dict(model=str(model), corpus=str(corpus), out=str(out), excerpt_len=T, top_k=4, random_k=7,
                quantile_k=3, quantile_prefix=24, hist_bins=10, batch_size=8, max_excerpts=38, seed=5,
                progress=False, device=DEVICE, dtype="float32")
    base.update(kw)
    return RecordConfig(**base)


ARCH_KW = {"gpt2": {"negatives": True}, "llama": {"bos": "yes"}}
"""gpt2 with negatives asked for; llama records them by default (gated) and gets a BOS token."""


@pytest.fixture(scope="module")
def reference_stores(tiny_models, corpus_file, tmp_path_factory):
    """The torch backend's recording of each architecture, made once for the module."""
    out = {}
    for arch, kw in ARCH_KW.items():
        path = tmp_path_factory.mktemp("ref") / arch
        record(config(tiny_models[arch], corpus_file, path, backend="torch", **kw), log=lambda *_: None)
        out[arch] = path
    return out


def checkpoint_arrays(path: Path) -> tuple[dict, list[dict]]:
    s = st.open_store(path)
    ck = s.progress["checkpoint"]
    negatives = s.spec["negatives"]
    layers, _ = st.read_checkpoint(path, ck, negatives)
    return s, layers


def moment_tolerance(count: int, moments: np.ndarray, amin: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """The bound of tests/kernels/test_update_parity.py written with stored values only: float32
    rounding of d = x - c moves M_k by at most k 2^-23 max|x| sum|d|^(k-1) per side, and by
    Cauchy-Schwarz sum|d| <= sqrt(n M2), sum|d|^3 <= sqrt(M2 M4). 8x margin, as there."""
    eps = 2.0**-23
    mx = np.maximum(np.abs(amin), np.abs(amax)).astype(np.float64)
    m2, m4 = moments[:, 1], moments[:, 3]
    scale = np.stack([mx, 2 * mx * np.sqrt(count * m2), 3 * mx * m2, 4 * mx * np.sqrt(m2 * m4)], 1)
    return 16 * eps * scale + 1e-12


def assert_same_recording(a: Path, b: Path) -> None:
    sa, la = checkpoint_arrays(a)
    sb, lb = checkpoint_arrays(b)
    assert sa.progress["excerpts_done"] == sb.progress["excerpts_done"]
    assert np.array_equal(sa.random_ids, sb.random_ids)
    for layer, ((xa, ca, ra), (xb, cb, rb)) in enumerate(zip(la, lb)):
        assert (ca, ra) == (cb, rb)
        for name in xa:
            if name == "moments":
                tol = moment_tolerance(ca, xa[name], xa["amin"], xa["amax"])
                assert np.all(np.abs(xa[name] - xb[name]) <= tol), f"layer {layer} moments"
            else:
                assert np.array_equal(xa[name], xb[name], equal_nan=xa[name].dtype.kind == "f"), f"layer {layer} {name}"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_triton_recording_equals_torch(arch, tiny_models, corpus_file, tmp_path, reference_stores):
    got = record(config(tiny_models[arch], corpus_file, tmp_path / "triton", backend="triton", **ARCH_KW[arch]),
                 log=lambda *_: None)
    assert got.complete and got.excerpts == 38
    assert_same_recording(reference_stores[arch], tmp_path / "triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_recording_equals_eager(backend, tiny_models, corpus_file, tmp_path, monkeypatch, reference_stores):
    # Inductor would compile C++ for minutes on this CPU; aot_eager traces the same graph (the
    # custom op inside it, the reference outside) and runs it without code generation.
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    got = record(config(tiny_models["gpt2"], corpus_file, tmp_path / "compiled", backend=backend, compile=True,
                        **ARCH_KW["gpt2"]), log=lambda *_: None)
    assert got.complete
    assert_same_recording(reference_stores["gpt2"], tmp_path / "compiled")
    if backend == "triton":  # the reductions live inside the one graph; the reference breaks it per layer
        assert not counters["graph_break"], dict(counters["graph_break"])
        # One graph while the quantile prefix runs and one after: bounds_ready is a constant of the
        # graph. Nothing that changes per batch causes a recompile.
        assert counters["stats"]["unique_graphs"] == 2


def test_compiled_reference_recording_of_a_deep_model_compiles_each_frame_a_few_times(corpus_file, tmp_path,
                                                                                      monkeypatch):
    # The reference runs outside the graph. Traced, the rest of its hook after the graph break was
    # guarded on the layer and recompiled once per layer: past dynamo's limit of 8 (any model with
    # more than 8 layers: GPT-2 has 12) the rest of the forward pass ran uncompiled, with warnings.
    import logging

    from tests.tiny import make_model

    model = make_model("gpt2", tmp_path / "deep", n_layer=12)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    said: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    catch = Catch()
    logging.getLogger("torch._dynamo").addHandler(catch)
    try:
        got = record(config(model, corpus_file, tmp_path / "s", backend="torch", compile=True, max_excerpts=24,
                            quantile_prefix=4), log=lambda *_: None)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(catch)
    assert got.complete and got.layers == 12
    assert not [m for m in said if "recompile_limit" in m], said


def test_nonfinite_activation_names_layer_and_batch(tiny_models, corpus_file, tmp_path):
    from engine.models import load_model

    # A NaN injected into layer 1's activations while the batch of excerpts 16..23 runs.
    cfg = config(tiny_models["gpt2"], corpus_file, tmp_path / "s", backend="triton", checkpoint_every=0.0)
    real_load = load_model
    seen = {"calls": 0}

    def poisoned_load(*a, **k):
        lm = real_load(*a, **k)

        def poison(mod, args, out):
            seen["calls"] += 1
            if seen["calls"] == 4:  # the trial excerpt, then the third batch through layer 1
                out[0, 3, 5] = float("nan")

        lm.modules[1].register_forward_hook(poison)
        return lm

    import engine.recorder as rec

    orig = rec.load_model
    rec.load_model = poisoned_load
    try:
        with pytest.raises(UserError, match=r"layer 1, batch starting at excerpt 16"):
            record(cfg, log=lambda *_: None)
    finally:
        rec.load_model = orig
    # The store keeps a checkpoint from before the NaN and can be read.
    s = st.open_store(tmp_path / "s")
    assert s.progress["excerpts_done"] <= 16


def test_cli_backend_flag(tiny_models, corpus_file, tmp_path, capsys):
    args = ["record", "--model", str(tiny_models["neox"]), "--corpus", str(corpus_file), "--excerpt-len", "8",
            "--device", DEVICE, "--dtype", "float32",
            "--max-excerpts", "12", "--batch-size", "6", "--top-k", "2", "--random-k", "2", "--quantile-k", "1",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--backend", "triton"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--backend", "torch"]) == 0
    assert_same_recording(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "c"), "--backend", "cuda-magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'cuda-magic'" in err and "triton" in err and len(err.strip().splitlines()) == 1


def test_triton_on_cpu_needs_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from kernels import select_update\n"
            "from kernels import reference\n"
            "assert select_update('auto', 'cpu') is reference.update_layer\n"
            "assert select_update('torch', 'cpu', in_graph=True) is None\n"
            "try:\n    select_update('triton', 'cpu')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "--backend torch" in out.stdout


def test_self_check_passes_on_working_kernels(device):
    """`--backend auto` on CUDA runs this check before trusting the kernels."""
    from kernels import triton_self_check

    assert triton_self_check(device) is None


def test_self_check_catches_moments_off_by_a_thousandth(device, monkeypatch):
    """The moments tolerance leaves room for float32 rounding but not for a kernel whose M2 is off
    by 1e-3 of its scale."""
    import kernels
    from kernels import triton_self_check, triton_update

    real = triton_update.update_layer

    def skewed(state, *args, **kwargs):
        flag = real(state, *args, **kwargs)
        state.moments[:, 1] *= 1.001
        return flag

    monkeypatch.setattr(triton_update, "update_layer", skewed)
    monkeypatch.setattr(kernels, "_checked", {})
    assert triton_self_check(device) == "the Triton kernels disagree with the reference on moments"


def test_side_stream_refused_off_cuda(tiny_models, corpus_file, tmp_path, capsys):
    """--side-stream is a CUDA feature: elsewhere it stops with one line before the store exists."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU the flag runs (test_side_stream_recording_equals_default)")
    args = ["record", "--model", str(tiny_models["gpt2"]), "--corpus", str(corpus_file), "--excerpt-len", "8",
            "--device", DEVICE, "--max-excerpts", "12", "--batch-size", "6", "--no-progress",
            "--out", str(tmp_path / "s"), "--backend", "triton", "--side-stream"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--side-stream needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(DEVICE != "cuda", reason="a second CUDA stream needs a GPU (NEURONATLAS_KERNEL_DEVICE=cuda)")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_side_stream_recording_equals_default(arch, tiny_models, corpus_file, tmp_path, monkeypatch, reference_stores):
    """The updates on a second stream, made to lag behind the main stream (a sleep queued before
    each), while the main stream fills fresh allocations with NaN after every MLP: if the
    activation's memory were handed on before its update read it, the recording would differ or
    stop on a NaN."""
    import engine.recorder as rec

    real_run = rec.SideStream.run

    def lagging(self, acts, fn):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(1_000_000)  # ~0.5 ms at 2 GHz
        return real_run(self, acts, fn)

    monkeypatch.setattr(rec.SideStream, "run", lagging)
    real_load = rec.load_model

    def scribbling_load(*a, **k):
        lm = real_load(*a, **k)
        parents = {id(child): mod for mod in lm.model.modules() for child in mod.children()}
        for n, module in zip(lm.n_neurons, lm.modules):
            # After the MLP returns its activation tensor is free: these take its memory unless
            # the update still holds it.
            def scribble(mod, args, out, n=n):
                for _ in range(4):
                    out.new_empty(out.shape[:-1] + (n,)).fill_(float("nan"))
            parents[id(module)].register_forward_hook(scribble)
        return lm

    monkeypatch.setattr(rec, "load_model", scribbling_load)
    got = record(config(tiny_models[arch], corpus_file, tmp_path / "side", backend="triton", side_stream=True,
                        **ARCH_KW[arch]), log=lambda *_: None)
    assert got.complete and got.excerpts == 38
    assert_same_recording(reference_stores[arch], tmp_path / "side")
