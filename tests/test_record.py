"""Every stored value equals a brute-force computation over the full activation tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import open_store
from engine.corpus import load_corpus
from engine.models import load_model
from engine.recorder import RecordConfig, make_hooks, record
from kernels.reference import QUANTILE_SALT, RANDOM_SALT, priorities

T = 12
BATCH = 5


def full_activations(model_dir, corpus_path, n_max=None, bos=False):
    """[n, T, N] float32 activations of every layer, by running every excerpt through the model."""
    lm = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    corpus = load_corpus(str(corpus_path), lm.tokenizer, T, n_max)
    acts = [[] for _ in lm.modules]

    def grab(i, a):
        acts[i].append((a[:, 1:] if bos else a).float().clone())

    handles = make_hooks(lm, grab)
    with torch.no_grad():
        for s in range(0, corpus.n_excerpts, BATCH):  # same batches as the recorder: bitwise equal
            toks = torch.from_numpy(corpus.tokens[s : s + BATCH].astype(np.int64))
            if bos:
                toks = torch.cat([torch.full((len(toks), 1), lm.tokenizer.bos_token_id), toks], 1)
            lm.model.base_model(input_ids=toks, use_cache=False)
    for h in handles:
        h.remove()
    return [torch.cat(a).numpy() for a in acts], corpus


def expected_extreme(emax_n, k, descending):
    ids = np.arange(len(emax_n))
    key = -emax_n if descending else emax_n
    order = np.lexsort((ids, key))  # by key, then id
    return order[:k]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_store_equals_brute_force(arch, tiny_models, corpus_file, tmp_path):
    K, R, S, P, H = 4, 7, 3, 24, 10
    cfg = RecordConfig(model=str(tiny_models[arch]), corpus=str(corpus_file), out=str(tmp_path / "s"),
                       excerpt_len=T, top_k=K, random_k=R, quantile_k=S, quantile_prefix=P, hist_bins=H,
                       batch_size=BATCH, max_excerpts=150, seed=3, progress=False,
                       negatives=True if arch == "gpt2" else None)
    summary = record(cfg, log=lambda *_: None)
    assert summary.complete and summary.excerpts == 150
    acts, corpus = full_activations(tiny_models[arch], corpus_file, 150)
    s = open_store(tmp_path / "s")
    assert s.n_layers == len(acts)
    assert s.n_neurons == [a.shape[2] for a in acts]
    assert np.array_equal(np.asarray(s.token_ids), corpus.tokens)
    n = corpus.n_excerpts
    ids = np.arange(n)
    rprio = priorities(ids, 3, RANDOM_SALT)
    qprio = priorities(ids, 3, QUANTILE_SALT)
    random_ids = np.lexsort((ids, rprio))[:R]
    # Gated models record negatives by default, others when asked (gpt2 here); neox does not.
    negatives = arch != "neox"
    assert s.spec["negatives"] is negatives
    p_eff = min(P, -(-n // 4))

    checked_buckets = 0
    for layer, A in enumerate(acts):
        N = A.shape[2]
        emax, emin = A.max(axis=1), A.min(axis=1)  # [n, N]
        for j in range(N):
            rec = s.neuron(layer, j)
            top = expected_extreme(emax[:, j], K, True)
            assert [r.excerpt_id for r in rec.most_positive_activation_records] == list(top)
            for r in rec.most_positive_activation_records:
                np.testing.assert_array_equal(np.float32(r.activations), A[r.excerpt_id, :, j])
                assert r.tokens == s.tokens(r.excerpt_id)
            if negatives:
                neg = expected_extreme(emin[:, j], K, False)
                assert [r.excerpt_id for r in rec.most_negative_activation_records] == list(neg)
                for r in rec.most_negative_activation_records:
                    np.testing.assert_array_equal(np.float32(r.activations), A[r.excerpt_id, :, j])
            else:
                assert rec.most_negative_activation_records is None
            assert [r.excerpt_id for r in rec.random_sample] == list(random_ids)
            for r in rec.random_sample:
                np.testing.assert_array_equal(np.float32(r.activations), A[r.excerpt_id, :, j])

            # Quantile boundaries from the prefix, then a uniform sample per bucket by priority.
            pm = emax[:p_eff, j].astype(np.float64)
            np.testing.assert_allclose(rec.quantile_boundaries, np.quantile(pm, s.spec["quantile_probs"]), rtol=1e-6)
            bounds = np.float32(rec.quantile_boundaries)
            later = np.arange(p_eff, n)
            bucket = (emax[later, j][:, None] >= bounds[None, :]).sum(1)
            for q, got in enumerate(rec.random_sample_by_quantile):
                members = later[bucket == q]
                want = members[np.lexsort((members, qprio[members]))][:S]
                assert [r.excerpt_id for r in got] == list(want)
                checked_buckets += len(want) > 0
                for r in got:
                    np.testing.assert_array_equal(np.float32(r.activations), A[r.excerpt_id, :, j])

            # Histogram of excerpt maxima over a range set by the prefix.
            lo, hi = pm.min(), pm.max()
            span = hi - lo
            lo_w, hi_w = (lo - 0.5, hi + 0.5) if span <= 0 else (lo, hi + 0.25 * span)
            np.testing.assert_allclose(rec.histogram_range, (lo_w, hi_w), rtol=1e-6)
            flo, fhi = np.float32(rec.histogram_range[0]), np.float32(rec.histogram_range[1])
            x = emax[:, j]
            b = np.clip(np.floor((x - flo) / (fhi - flo) * np.float32(H)), 0, H - 1).astype(int) + 1
            b = np.where(x < flo, 0, np.where(x > fhi, H + 1, b))
            assert rec.histogram == list(np.bincount(b, minlength=H + 2))
            assert sum(rec.histogram) == n

            # Moments over all tokens, against float64 numpy.
            v = A[:, :, j].astype(np.float64).ravel()
            mu, var = v.mean(), v.var()
            assert rec.mean == pytest.approx(mu, rel=1e-6, abs=1e-9)
            assert rec.variance == pytest.approx(var, rel=1e-6)
            d = v - mu
            assert rec.skewness == pytest.approx((d**3).mean() / var**1.5, rel=1e-5, abs=1e-8)
            assert rec.kurtosis == pytest.approx((d**4).mean() / var**2 - 3, rel=1e-5, abs=1e-8)
            assert rec.min == v.min() and rec.max == v.max()
            assert rec.frac_positive == pytest.approx((v > 0).mean())
    assert checked_buckets > 0


def test_priorities_of_every_seed(tiny_models, corpus_file, tmp_path):
    ids = np.arange(3)
    # Seeds below 2^24 keep the priorities of the stores recorded before larger seeds worked, so
    # that those stores resume with the same samples.
    assert priorities(ids, 0, RANDOM_SALT).tolist() == [8629184034409012729, 9134828769460989189, 3730254823819611669]
    assert priorities(ids, 5, RANDOM_SALT).tolist() == [430869920891027906, 980610439884341498, 8377941274728943012]
    assert priorities(ids, 2**24 - 1, RANDOM_SALT)[0] == 8575349608290412762
    big = [2**24, 2**40, 2**63 - 1]
    for seed in big:
        for salt in (RANDOM_SALT, QUANTILE_SALT):
            p = priorities(np.arange(1000), seed, salt)
            assert p.dtype == np.int64 and (p >= 0).all() and len(set(p.tolist())) == 1000
    assert len({priorities(ids, s, RANDOM_SALT)[0] for s in [0, 2**24 - 1] + big}) == 5

    # The largest seed records, and its random sample is the one its priorities choose.
    cfg = RecordConfig(model=str(tiny_models["gpt2"]), corpus=str(corpus_file), out=str(tmp_path / "s"),
                       excerpt_len=T, top_k=3, random_k=6, quantile_k=2, quantile_prefix=8, batch_size=8,
                       max_excerpts=40, seed=2**63 - 1, progress=False)
    assert record(cfg, log=lambda *_: None).complete
    s = open_store(tmp_path / "s")
    ids = np.arange(40)
    assert s.spec["seed"] == 2**63 - 1
    assert s.random_ids.tolist() == np.lexsort((ids, priorities(ids, 2**63 - 1, RANDOM_SALT)))[:6].tolist()


def test_splits_are_disjoint(tiny_models, corpus_file, tmp_path):
    cfg = RecordConfig(model=str(tiny_models["gpt2"]), corpus=str(corpus_file), out=str(tmp_path / "s"),
                       excerpt_len=T, top_k=12, random_k=40, batch_size=16, max_excerpts=100, progress=False)
    record(cfg, log=lambda *_: None)
    rec = open_store(tmp_path / "s").neuron(1, 5)
    splits = {name: rec.split(name) for name in ("train", "calibration", "valid", "test")}
    train_ids = {r.excerpt_id for r in splits["train"].top}
    assert len(train_ids) == 3
    seen = set()
    for name, sp in splits.items():
        ids = {r.excerpt_id for r in sp.top}
        assert not ids & seen
        seen |= ids
        assert not {r.excerpt_id for r in sp.random} & train_ids
    assert seen == {r.excerpt_id for r in rec.most_positive_activation_records}
    with pytest.raises(ValueError):
        rec.split("holdout")


def test_bos_position_is_not_recorded(tiny_models, corpus_file, tmp_path):
    cfg = RecordConfig(model=str(tiny_models["llama"]), corpus=str(corpus_file), out=str(tmp_path / "s"),
                       excerpt_len=T, top_k=3, random_k=4, batch_size=BATCH, max_excerpts=30, bos="yes",
                       progress=False)
    record(cfg, log=lambda *_: None)
    acts, _ = full_activations(tiny_models["llama"], corpus_file, 30, bos=True)
    s = open_store(tmp_path / "s")
    assert s.run["bos"] is True
    rec = s.neuron(0, 2)
    for r in rec.most_positive_activation_records:
        assert len(r.activations) == T
        np.testing.assert_array_equal(np.float32(r.activations), acts[0][r.excerpt_id, :, 2])


def test_memory_estimate_matches_allocation_and_gpt2_xl_fits():
    from engine.recorder import memory_plan
    from kernels.reference import LayerState, ReductionSpec, state_bytes

    for negatives, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        spec = ReductionSpec(excerpt_len=16, top_k=5, negatives=negatives, random_k=3, quantile_prefix=7)
        st = LayerState.empty(spec, 11, dtype, "cpu")
        allocated = sum(v.numel() * v.element_size() for v in vars(st).values() if isinstance(v, torch.Tensor))
        # The estimate also counts the few host-side scalars; it may not undercount.
        assert allocated <= state_bytes(spec, 11, dtype) <= allocated + 11 * 64
    # GPT-2 XL: 48 layers of 6,400 neurons, 1.56B parameters in bf16, K = 50, batch 256.
    plan = memory_plan(ReductionSpec(excerpt_len=64), [6400] * 48, torch.bfloat16, 1_557_611_200, 2, 256, 1600)
    assert plan["total"] < 80e9
    assert 8e9 < plan["state"] < 10e9
