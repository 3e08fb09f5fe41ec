"""Scores of a simulation: how well simulated activations match the true ones.

Everything is pooled over all tokens of all scored excerpts, as in the paper (a correlation per
excerpt and then a mean would reward getting the easy excerpts right):

* `score` - Pearson correlation of true and simulated activations over the top and random excerpts
  of the scored split (the paper's headline number);
* `score_random_only` - the same over the random excerpts only (does the explanation also predict
  where the neuron stays quiet, on ordinary text?);
* `rsquared` and `absolute_dev_explained` - after mapping the simulation onto the activation scale
  with a line fitted by least squares on the calibration split (or on the raw 0..10 values when
  calibration is off): 1 - sum((y - yhat)^2) / sum((y - mean y)^2) and
  1 - sum|y - yhat| / sum|y - mean y|. Both are relative to predicting the mean, so 0 is "no better
  than a constant" and they can be negative.

A score that cannot be computed is undefined (None here, NaN in numpy terms, "undefined" when
printed), never zero: a correlation is undefined when either side is constant, which is what a
neuron that never fires or a simulator that writes the same value everywhere gives. `undefined`
says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def pooled(pairs: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros(0), np.zeros(0)
    true = np.concatenate([np.asarray(t, dtype=np.float64) for t, _ in pairs])
    sim = np.concatenate([np.asarray(s, dtype=np.float64) for _, s in pairs])
    if true.shape != sim.shape:
        raise ValueError(f"{true.size} true activations but {sim.size} simulated ones")
    return true, sim


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length sequences; NaN when undefined (fewer than two values,
    a constant side, a non-finite value)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"lengths differ: {x.size} and {y.size}")
    if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    dx = x - x.mean()
    dy = y - y.mean()
    sxx = float(dx @ dx)
    syy = float(dy @ dy)
    # A side whose spread is rounding noise around its mean is constant.
    if sxx <= 1e-24 * max(1.0, float(x @ x)) or syy <= 1e-24 * max(1.0, float(y @ y)):
        return math.nan
    return float(np.clip((dx @ dy) / math.sqrt(sxx * syy), -1.0, 1.0))


def fit_line(sim, true) -> tuple[float, float] | None:
    """(slope, intercept) of the least-squares line true ~ slope * sim + intercept; None when the
    simulation is constant (no line is determined)."""
    sim = np.asarray(sim, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if sim.size < 2:
        return None
    ds = sim - sim.mean()
    sss = float(ds @ ds)
    if sss <= 1e-24 * max(1.0, float(sim @ sim)):
        return None
    slope = float(ds @ (true - true.mean())) / sss
    return slope, float(true.mean() - slope * sim.mean())


def rsquared(true, pred) -> float:
    """1 - SS_res / SS_tot around the mean of `true`; NaN when `true` is constant."""
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    tot = float(np.sum((true - true.mean()) ** 2)) if true.size else 0.0
    if true.size < 2 or tot <= 1e-24 * max(1.0, float(true @ true)):
        return math.nan
    return 1.0 - float(np.sum((true - pred) ** 2)) / tot


def absolute_dev_explained(true, pred) -> float:
    """1 - sum|true - pred| / sum|true - mean(true)|; NaN when `true` is constant."""
    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    tot = float(np.sum(np.abs(true - true.mean()))) if true.size else 0.0
    if true.size < 2 or tot <= 1e-12 * max(1.0, float(np.sum(np.abs(true)))):
        return math.nan
    return 1.0 - float(np.sum(np.abs(true - pred))) / tot


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Scores:
    """The scores of one explanation of one neuron; None = undefined."""

    score: float | None
    """Pooled correlation over top and random excerpts of the scored split (the headline)."""
    score_random_only: float | None
    """Pooled correlation over the random excerpts only."""
    rsquared: float | None
    """R^2 of the (calibrated) simulation on the scored split."""
    absolute_dev_explained: float | None
    """Absolute deviation explained by the (calibrated) simulation on the scored split."""
    calibration: dict | None = None
    """{'slope', 'intercept'} fitted on the calibration split, or None (off, or not determined)."""
    undefined: dict = field(default_factory=dict)
    """Why a score is undefined, by score name."""

    def to_json(self) -> dict:
        return {"score": self.score, "score_random_only": self.score_random_only, "rsquared": self.rsquared,
                "absolute_dev_explained": self.absolute_dev_explained, "calibration": self.calibration,
                "undefined": self.undefined}


def _why(true: np.ndarray, sim: np.ndarray, what: str) -> str:
    if true.size < 2:
        return f"fewer than two tokens in the {what}"
    if np.ptp(true) == 0:
        return (f"the neuron never fires on the {what} (its activation is constant)" if np.all(true <= 0)
                else f"the neuron's activation is constant on the {what}")
    if np.ptp(sim) == 0:
        return f"the simulation is constant on the {what}"
    return f"not computable on the {what}"


def score_simulation(top: list[tuple[list[float], list[float]]], random: list[tuple[list[float], list[float]]],
                     calibration: list[tuple[list[float], list[float]]] | None = None) -> Scores:
    """Scores from (true activations, simulated values) per excerpt: `top` and `random` excerpts of the
    scored split, and the calibration split's excerpts (None: no calibration)."""
    undefined: dict[str, str] = {}
    true_all, sim_all = pooled(top + random)
    true_rnd, sim_rnd = pooled(random)
    score = pearson(true_all, sim_all)
    if math.isnan(score):
        undefined["score"] = _why(true_all, sim_all, "scored excerpts")
    score_rnd = pearson(true_rnd, sim_rnd)
    if math.isnan(score_rnd):
        undefined["score_random_only"] = ("no random excerpts were scored" if true_rnd.size == 0
                                          else _why(true_rnd, sim_rnd, "random excerpts"))
    cal = None
    pred = sim_all
    if calibration is not None:
        true_cal, sim_cal = pooled(calibration)
        line = fit_line(sim_cal, true_cal)
        if line is None:
            why = ("no calibration excerpts" if sim_cal.size == 0
                   else "the simulation is constant on the calibration excerpts, so no calibration line is determined")
            undefined["rsquared"] = undefined["absolute_dev_explained"] = why
            return Scores(_none(score), _none(score_rnd), None, None, None, undefined)
        cal = {"slope": line[0], "intercept": line[1]}
        pred = line[0] * sim_all + line[1]
    r2 = rsquared(true_all, pred)
    ade = absolute_dev_explained(true_all, pred)
    for name, value in (("rsquared", r2), ("absolute_dev_explained", ade)):
        if math.isnan(value):
            undefined[name] = _why(true_all, np.arange(2.0), "scored excerpts")  # only the true side can be at fault
    return Scores(_none(score), _none(score_rnd), _none(r2), _none(ade), cal, undefined)


def fmt(x: float | None, digits: int = 3) -> str:
    """A score for people: 'undefined' when it is."""
    return "undefined" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
