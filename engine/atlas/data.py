"""What the atlas commands share: a neuron's explanations, layer selection, and a parallel map
over neurons that keeps to the store's public reader."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

IMPORTED_EXPLANATIONS = "imported-explanations"
"""Directory inside an imported store holding the published `explanations/{layer}/{neuron}.jsonl`
files verbatim (see docs/ATLAS.md); the atlas, `show` and `export` read them."""


@dataclass
class Explanation:
    """One explanation of a neuron, as the atlas shows it."""

    text: str
    """The explanation."""
    score: float | None
    """Its score (correlation of simulated and true activations), None when not scored."""
    source: str
    """Where it came from: 'store' (explain/score commands) or 'imported' (published files)."""


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def from_store_dict(d: dict) -> Explanation:
    """An entry of `Store.explanations()`: {'explanation' or 'text': str, 'score': float | dict}."""
    text = d.get("explanation", d.get("text", ""))
    score = d.get("score", d.get("ev_correlation_score"))
    if isinstance(score, dict):  # e.g. {"all": 0.4, "top": ..., "random": ...}
        score = score.get("all", score.get("ev_correlation_score", next(iter(score.values()), None)))
    if score is None and isinstance(d.get("scored_simulation"), dict):
        score = d["scored_simulation"].get("ev_correlation_score")
    return Explanation(str(text), _num(score), "store")


def parse_openai_explanations(text: str) -> list[Explanation]:
    """The scored explanations of one published `explanations/{layer}/{neuron}.jsonl` file (a
    NeuronSimulationResults per line; OpenAI's files hold one line)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        for e in obj.get("scored_explanations") or obj.get("explanations") or []:
            sim = e.get("scored_simulation") or {}
            out.append(Explanation(str(e.get("explanation", "")), _num(sim.get("ev_correlation_score")), "imported"))
    return out


def imported_explanations_file(store_path: Path, layer: int, index: int) -> Path:
    return Path(store_path) / IMPORTED_EXPLANATIONS / str(layer) / f"{index}.jsonl"


def explanations(store, layer: int, index: int) -> list[Explanation]:
    """Every explanation of a neuron: the store's own, then any imported with the recording."""
    out = [from_store_dict(d) for d in store.explanations(layer, index)]
    f = imported_explanations_file(store.path, layer, index)
    if f.is_file():
        try:
            out += parse_openai_explanations(f.read_text(encoding="utf-8"))
        except (ValueError, AttributeError):
            pass  # validated on import; a hand-edited file is skipped rather than fatal
    return out


def best(expls: list[Explanation]) -> Explanation | None:
    """The highest-scoring explanation, or the first when none is scored."""
    scored = [e for e in expls if e.score is not None]
    if scored:
        return max(scored, key=lambda e: e.score)
    return expls[0] if expls else None


def is_absent(rec) -> bool:
    """A neuron with no excerpts at all: a gap in an imported recording (never in a recorded one)."""
    return not (rec.most_positive_activation_records or rec.random_sample
                or any(rec.random_sample_by_quantile))


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'3', '0,2', '4-7' or None (all) -> sorted layer indices, checked against the store."""
    if not spec:
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise UserError(f"--layers '{spec}' is not a list of layers like 0,3,5-7") from None
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"--layers: layer {bad[0]} out of range: the store has layers 0..{n_layers - 1}")
    return sorted(out)


def default_jobs(n_neurons: int) -> int:
    """Worker processes for a whole-store pass: one for small stores (spawning costs seconds)."""
    return 1 if n_neurons < 4096 else max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# A map over neurons. Each worker process opens the store itself and calls `fn(store, layer,
# index, arg)` (a module-level function, so that it pickles); workers write their own output
# files and return small results. Spawned, not forked: zarr keeps an event-loop thread.

_worker: dict = {}


def _init(store_path: str) -> None:
    from engine.store import open_store

    _worker["store"] = open_store(store_path)


def _run_block(fn, block, arg):
    s = _worker["store"]
    return [fn(s, layer, index, arg) for layer, index in block]


def map_neurons(store, items: list[tuple[int, int]], fn, arg, jobs: int, progress=None):
    """[fn(store, layer, index, arg) for (layer, index) in items], in order, on `jobs` processes.
    `progress(n)` is called as neurons finish."""
    if jobs <= 1 or len(items) < 256:
        out = []
        for layer, index in items:
            out.append(fn(store, layer, index, arg))
            if progress:
                progress(1)
        return out
    import multiprocessing as mp

    size = 128
    blocks = [items[i : i + size] for i in range(0, len(items), size)]
    out = []
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(str(store.path),)) as ex:
        for res in ex.map(_run_block, [fn] * len(blocks), blocks, [arg] * len(blocks)):
            out.extend(res)
            if progress:
                progress(len(res))
    return out


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (disabled when not wanted); returns (update, close)."""
    if not enabled:
        return None, lambda: None
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, unit="neuron", desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    return bar.update, bar.close
