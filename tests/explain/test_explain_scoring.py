"""Scoring equals a plain numpy reference, and an undefined score is reported as undefined, never 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.pipeline import score_record
from client.scoring import absolute_dev_explained, fmt, pearson, rsquared, score_simulation


def _excerpts(rng, n, lo=3, hi=20, fire=0.3):
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        true = rng.normal(size=length) * (rng.random(length) < fire)
        sim = np.clip(3 * true + rng.normal(size=length), 0, 10)
        out.append((true.tolist(), sim.tolist()))
    return out


def _reference(top, random, calibration):
    """The definitions, written out once more with numpy's own functions."""
    t = np.concatenate([np.array(a) for a, _ in top + random])
    s = np.concatenate([np.array(b) for _, b in top + random])
    tr = np.concatenate([np.array(a) for a, _ in random])
    sr = np.concatenate([np.array(b) for _, b in random])
    tc = np.concatenate([np.array(a) for a, _ in calibration])
    sc = np.concatenate([np.array(b) for _, b in calibration])
    slope, intercept = np.polyfit(sc, tc, 1)
    pred = slope * s + intercept
    r2 = 1 - np.sum((t - pred) ** 2) / np.sum((t - t.mean()) ** 2)
    ade = 1 - np.sum(np.abs(t - pred)) / np.sum(np.abs(t - t.mean()))
    return np.corrcoef(t, s)[0, 1], np.corrcoef(tr, sr)[0, 1], r2, ade


@pytest.mark.parametrize("trial", range(6))
def test_scores_match_numpy_reference(trial):
    rng = np.random.default_rng()  # fresh inputs every run; uneven excerpt lengths
    top, random, cal = _excerpts(rng, int(rng.integers(1, 6))), _excerpts(rng, int(rng.integers(1, 6))), _excerpts(rng, 4)
    scores = score_simulation(top, random, cal)
    with np.errstate(all="ignore"):
        ref = _reference(top, random, cal)
    got = [np.nan if v is None else v for v in (scores.score, scores.score_random_only, scores.rsquared,
                                                  scores.absolute_dev_explained)]
    # float64 throughout; differences are summation order only. Where numpy says NaN (a random
    # sample that never fires, drawn now and then), ours must say undefined.
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert set(scores.undefined) == {name for name, v in zip(
        ("score", "score_random_only", "rsquared", "absolute_dev_explained"), got) if np.isnan(v)}


@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(0, 10)), min_size=2, max_size=60))
@settings(max_examples=200, deadline=None)
def test_pearson_matches_corrcoef(pairs):
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    got = pearson(x, y)
    if np.ptp(x) < 1e-9 * max(1.0, np.abs(x).max()) or np.ptp(y) < 1e-9 * max(1.0, np.abs(y).max()):
        return  # near-constant sides: numpy's answer is rounding noise; ours may call it undefined
    with np.errstate(all="ignore"):
        ref = np.corrcoef(x, y)[0, 1]
    assert got == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_rsquared_and_deviation_match_definitions():
    rng = np.random.default_rng()
    t, p = rng.normal(size=50), rng.normal(size=50)
    assert rsquared(t, p) == pytest.approx(1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2))
    assert absolute_dev_explained(t, p) == pytest.approx(1 - np.sum(np.abs(t - p)) / np.sum(np.abs(t - t.mean())))
    assert rsquared(t, t) == 1.0 and absolute_dev_explained(t, t) == 1.0


def test_a_neuron_that_never_fires_is_undefined_not_zero():
    top = [([0.0] * 5, [0.0, 3.0, 1.0, 0.0, 2.0])]
    random = [([0.0] * 4, [1.0, 0.0, 0.0, 4.0])]
    s = score_simulation(top, random, [([0.0] * 3, [1.0, 2.0, 3.0])])
    assert s.score is None and s.score_random_only is None and s.rsquared is None
    assert "never fires" in s.undefined["score"]
    assert fmt(s.score) == "undefined"


def test_a_constant_simulation_is_undefined_not_zero():
    top = [([0.0, 2.0, 5.0], [3.0, 3.0, 3.0])]
    random = [([0.1, 0.0], [3.0, 3.0])]
    s = score_simulation(top, random, [([1.0, 0.0], [3.0, 3.0])])
    assert s.score is None and "simulation is constant" in s.undefined["score"]
    assert s.rsquared is None and "calibration" in s.undefined["rsquared"]
    assert math.isnan(pearson([1, 2, 3], [4, 4, 4]))


def test_without_calibration_rsquared_uses_raw_values():
    top = [([0.0, 1.0, 2.0], [0.0, 5.0, 10.0])]
    s = score_simulation(top, [], None)
    assert s.score == pytest.approx(1.0) and s.score_random_only is None
    assert "no random excerpts" in s.undefined["score_random_only"]
    assert s.rsquared == pytest.approx(rsquared([0, 1, 2], [0, 5, 10]))
    assert s.calibration is None


def test_best_of_n_keeps_the_best_scoring_explanation():
    def cand(text, sim):
        return {"explanation": text, "simulation": {"excerpts": [
            {"split": "valid", "set": "top", "true": [0.0, 1.0, 0.0, 2.0], "sim": sim},
            {"split": "calibration", "set": "top", "true": [0.0, 1.0], "sim": sim[:2]}]}}

    rec = {"status": "simulated", "simulation": {"split": "valid"},
           "candidates": [cand("wrong", [5.0, 0.0, 5.0, 0.0]), cand("constant", [1.0] * 4), cand("right", [0.0, 5.0, 0.0, 9.0])]}
    out = score_record(rec)
    assert out["status"] == "scored" and out["explanation"] == "right"
    assert out["score"] == pytest.approx(np.corrcoef([0, 1, 0, 2], [0, 5, 0, 9])[0, 1])
    assert [c["scores"]["score"] is None for c in out["candidates"]] == [False, True, False]
    assert out["candidates"][0]["scores"]["score"] < 0


def test_best_of_n_is_chosen_on_calibration_not_on_the_scored_split():
    from client.pipeline import score_record

    true = [0.0, 0.0, 5.0, 0.0, 9.0, 0.0]
    good, bad = [0, 0, 5, 0, 9, 0], [9, 0, 0, 5, 0, 0]

    def candidate(name, cal_sim, valid_sim):
        ex = [{"split": "calibration", "set": "top", "true": true, "sim": cal_sim},
              {"split": "valid", "set": "top", "true": true, "sim": valid_sim},
              {"split": "valid", "set": "random", "true": true, "sim": valid_sim}]
        return {"explanation": name, "simulation": {"excerpts": ex}}

    # A is right on calibration but wrong on valid; B the other way round. Picking by the reported
    # (valid) score would pick B and report its inflated score; picking on calibration picks A.
    rec = {"status": "simulated", "split": "valid",
           "candidates": [candidate("A", good, bad), candidate("B", bad, good)]}
    out = score_record(rec)
    assert out["explanation"] == "A"
    assert out["score"] < 0.5
    want = [1.0, np.corrcoef(true, bad)[0, 1]]
    assert [c["selection_score"] for c in out["candidates"]] == pytest.approx(want, abs=1e-9)


def test_a_simulation_without_calibration_is_scored_on_raw_values():
    """`simulate --no-calibration` then a plain `score`: R^2 and deviation explained of the raw
    0..10 values (as documented), not undefined for want of the calibration excerpts it chose not to
    simulate. A simulation that was meant to have them and has none stays undefined."""
    true, sim = [0.0, 1.0, 0.0, 2.0, 0.5], [0.0, 5.0, 1.0, 9.0, 2.0]
    excerpts = [{"split": "valid", "set": "top", "true": true, "sim": sim}]

    def rec(calibration):
        return {"status": "simulated", "simulation": {"split": "valid", "calibration": calibration},
                "candidates": [{"explanation": "x", "simulation": {"excerpts": excerpts}}]}

    for out in (score_record(rec(False)), score_record(rec(False), calibration=True), score_record(rec(True), False)):
        assert out["rsquared"] == pytest.approx(rsquared(true, sim))
        assert out["absolute_dev_explained"] == pytest.approx(absolute_dev_explained(true, sim))
        assert out["calibration"] is None and "rsquared" not in (out["undefined"] or {})
    out = score_record(rec(True))
    assert out["rsquared"] is None and out["undefined"]["rsquared"] == "no calibration excerpts"


def test_score_after_simulate_no_calibration_through_the_cli(store, fake_server, cli):
    import json

    select = ["--layers", "0", "--neurons", "0-5"]
    with fake_server() as (server, fake):
        flags = ["--base-url", server.base_url, "--progress", "off", *select]
        assert cli("explain", store, "--explainer-model", "m", *flags)[0] == 0
        rc, _, err = cli("simulate", store, "--no-calibration", *flags)
        assert rc == 0, err
    rc, _, err = cli("score", store, *select)  # no --no-calibration: the simulation's own setting holds
    assert rc == 0, err
    checked = 0
    for path in sorted((store / "explanations" / "m__m__v1" / "neurons" / "000").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec["status"] != "scored" or rec["score"] is None:
            continue
        best = next(c for c in rec["candidates"] if c["explanation"] == rec["explanation"])
        ex = best["simulation"]["excerpts"]
        assert ex and all(e["split"] == "valid" for e in ex)  # no calibration excerpts were simulated
        t = np.concatenate([e["true"] for e in ex])
        y = np.concatenate([e["sim"] for e in ex])
        assert rec["rsquared"] == pytest.approx(rsquared(t, y)), rec["undefined"]
        assert rec["absolute_dev_explained"] == pytest.approx(absolute_dev_explained(t, y))
        checked += 1
    assert checked >= 2


def test_best_of_n_never_prefers_an_undefined_calibration_by_its_reported_score():
    """A candidate constant on the calibration excerpts (correlation undefined there) fell back to
    its scored-split score and beat candidates chosen on calibration: the inflation the rule avoids."""
    true = [0.0, 0.0, 5.0, 0.0, 9.0, 0.0]

    def candidate(name, cal_sim, valid_sim):
        return {"explanation": name, "simulation": {"excerpts": [
            {"split": "calibration", "set": "top", "true": true, "sim": cal_sim},
            {"split": "valid", "set": "top", "true": true, "sim": valid_sim}]}}

    rec = {"status": "simulated", "split": "valid", "candidates": [
        candidate("lucky", [3] * 6, [0, 0, 5, 0, 9, 0]),        # undefined on calibration, perfect on valid
        candidate("honest", [0, 1, 5, 0, 6, 2], [0, 2, 4, 1, 5, 0])]}
    out = score_record(rec)
    assert out["explanation"] == "honest"
    assert [c["selection_score"] is None for c in out["candidates"]] == [True, False]
    # All undefined on calibration: the first sample, not the best scored one.
    rec["candidates"][1] = candidate("second", [2] * 6, [0, 0, 5, 0, 9, 0])
    rec["candidates"][0] = candidate("first", [3] * 6, [9, 0, 0, 5, 0, 0])
    assert score_record(rec)["explanation"] == "first"
