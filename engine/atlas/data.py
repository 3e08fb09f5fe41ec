"""What the atlas commands share: a neuron's explanations, layer selection, and a parallel map
over neurons that keeps to the store's public reader."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserError

IMPORTED_EXPLANATIONS = "imported_explanations"
"""Zarr group of an imported store holding the published `explanations/{layer}/{neuron}.jsonl`
files verbatim: arrays `layer`, `neuron` [M], `offsets` [M + 1] and `bytes` (file i is
bytes[offsets[i]:offsets[i + 1]], UTF-8). See docs/STORE_IMPORT.md."""


@dataclass
class Explanation:
    """One explanation of a neuron, as the atlas shows it."""

    text: str
    """The explanation."""
    score: float | None
    """Its score (correlation of simulated and true activations), None when not scored."""
    source: str
    """Where it came from: 'explained by MODEL' (the explain/score commands) or 'imported'."""
    undefined: str | None = None
    """Why its score is undefined when it was scored and has none (a constant simulation, ...)."""

    @property
    def score_text(self) -> str:
        """'score 0.412', 'score undefined (why)' or 'not scored'."""
        if self.score is not None:
            return f"score {self.score:.3f}"
        return f"score undefined ({self.undefined})" if self.undefined else "not scored"


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def from_store_dict(d: dict) -> Explanation | None:
    """An entry of `Store.explanations()` (keys `explanation`, `score`, `explainer_model`, ...; see
    its docstring), or None for an entry without an explanation yet (pending, failed)."""
    text = d.get("explanation", d.get("text"))
    if not isinstance(text, str) or not text.strip():
        return None
    score = d.get("score", d.get("ev_correlation_score"))
    if isinstance(score, dict):  # e.g. {"all": 0.4, "top": ..., "random": ...}
        score = score.get("all", score.get("ev_correlation_score", next(iter(score.values()), None)))
    if score is None and isinstance(d.get("scored_simulation"), dict):
        score = d["scored_simulation"].get("ev_correlation_score")
    model = d.get("explainer_model")
    why = d.get("undefined") if _num(score) is None and d.get("status") == "scored" else None
    if isinstance(why, dict):  # {"score": "the simulation is constant", ...}
        why = why.get("score") or next((v for v in why.values() if isinstance(v, str)), None)
    why = why if isinstance(why, str) and why.strip() else ("no reason given" if why is not None else None)
    return Explanation(text, _num(score), f"explained by {model}" if model else "store", why)


def notes(store, layer: int, index: int) -> list[str]:
    """One line per results group that has no explanation of this neuron to show and says why: a
    stage that failed ('explain failed (explainer M): message', as the explain / simulate commands
    wrote it), or a neuron that never fires where the explainer looks."""
    out = []
    for d in store.explanations(layer, index):
        if d.get("status") == "never_fires":
            out.append(f"not explained (explainer {d.get('explainer_model')}): it never fires above 0 in the "
                       "excerpts the explainer is shown")
        if d.get("status") != "failed":
            continue
        error = d.get("error") if isinstance(d.get("error"), dict) else {}
        stage = error.get("stage") if isinstance(error.get("stage"), str) else "a stage"
        message = error.get("message") if isinstance(error.get("message"), str) else "no message"
        who = (f"simulator {d.get('simulator_model')}" if stage == "simulate" else f"explainer {d.get('explainer_model')}")
        out.append(f"{stage} failed ({who}): {message}")
    return out


class BadExplanations(ValueError):
    """A published explanations file that holds something other than explanations."""


def parse_openai_explanations(text: str) -> list[Explanation]:
    """The scored explanations of one published `explanations/{layer}/{neuron}.jsonl` file (a
    NeuronSimulationResults per line; OpenAI's files hold one line). An explanation that is not a
    string raises BadExplanations (import refuses the file)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        field = "scored_explanations" if obj.get("scored_explanations") else "explanations"
        for i, e in enumerate(obj.get(field) or []):
            if not isinstance(e.get("explanation"), str):
                got = json.dumps(e.get("explanation"))[:40] if "explanation" in e else "nothing"
                raise BadExplanations(f"line {n}: {field}[{i}].explanation is {got}, not a string")
            sim = e.get("scored_simulation") or {}
            out.append(Explanation(e["explanation"], _num(sim.get("ev_correlation_score")), "imported"))
    return out


_imported_index: dict[str, tuple] = {}


def imported_explanations_text(store, layer: int, index: int) -> str | None:
    """The published explanations file imported with a neuron's recording, or None; a damaged
    store's UserError."""
    from engine import store as st

    path = Path(store.path).resolve()
    try:
        return _imported_text(path, layer, index)
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, IndexError, UnicodeDecodeError) as exc:
        raise st._damaged(store.path, exc) from None


def imported_neurons(store) -> list[tuple[int, int]]:
    """(layer, neuron) of every neuron whose published explanations were imported with the store."""
    from engine import store as st

    path = Path(store.path).resolve()
    try:
        _imported_text(path, -1, -1)  # loads the index
        return sorted(_imported_index[_index_key(path)][0])
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, IndexError) as exc:
        raise st._damaged(store.path, exc) from None


def _index_key(path: Path) -> str:
    return f"{path}@{(path / 'zarr.json').stat().st_mtime_ns}"  # a store replaced at the same path


def _imported_text(path: Path, layer: int, index: int) -> str | None:
    import zarr

    key = _index_key(path)
    if key not in _imported_index:
        root = zarr.open_group(str(path), mode="r")
        if IMPORTED_EXPLANATIONS in root:
            g = root[IMPORTED_EXPLANATIONS]
            where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(g["layer"][...], g["neuron"][...]))}
            _imported_index[key] = (where, np.asarray(g["offsets"][...]), g["bytes"])
        else:
            _imported_index[key] = ({}, None, None)
    where, offsets, data = _imported_index[key]
    i = where.get((layer, index))
    if i is None:
        return None
    return np.asarray(data[int(offsets[i]) : int(offsets[i + 1])]).tobytes().decode("utf-8")


def write_imported_explanations(root, files: list[tuple[int, int, Path]]) -> None:
    """Store the published explanation files (layer, neuron, path) verbatim in `root` (an open
    store group), streaming their bytes so that no more than one file is held in memory."""
    from engine import store as st

    sizes = [p.stat().st_size for _, _, p in files]
    offsets = np.zeros(len(files) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    g = root.create_group(IMPORTED_EXPLANATIONS, attributes={
        "description": "published explanation files (NeuronSimulationResults JSON lines), verbatim: "
                       "file i is bytes[offsets[i]:offsets[i+1]] for neuron (layer[i], neuron[i])"})
    st.write_array(g, "layer", np.array([f[0] for f in files], dtype=np.int32), {}, ("file",))
    st.write_array(g, "neuron", np.array([f[1] for f in files], dtype=np.int32), {}, ("file",))
    st.write_array(g, "offsets", offsets, {}, ("file_edge",))
    total = int(offsets[-1])
    block = 1 << 22
    arr = g.create_array("bytes", shape=(total,), dtype=np.uint8, chunks=(max(1, min(total, block)),),
                         compressors=st._blosc(1), fill_value=0, dimension_names=("byte",))
    buf, start = bytearray(), 0
    for (_, _, p), size in zip(files, sizes):
        content = p.read_bytes()
        if len(content) != size:
            raise UserError(f"{p} changed while it was being imported; run the import again")
        buf += content
        if len(buf) >= block:
            arr[start : start + len(buf)] = np.frombuffer(bytes(buf), dtype=np.uint8)
            start += len(buf)
            buf = bytearray()
    if buf:
        arr[start : start + len(buf)] = np.frombuffer(bytes(buf), dtype=np.uint8)


def explanations(store, layer: int, index: int) -> list[Explanation]:
    """Every explanation of a neuron: the store's own, then any imported with the recording."""
    out = [e for e in map(from_store_dict, store.explanations(layer, index)) if e is not None]
    text = imported_explanations_text(store, layer, index)
    if text is not None:
        try:
            out += parse_openai_explanations(text)
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass  # checked on import
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
    """'all', '3', '0,2', '4-7' or None (not given: all) -> sorted layer indices, checked against
    the store. The same parser as the explain commands' (client.neurons.parse_ranges): an empty
    selection or an empty item is refused, never read as 'all'."""
    from client.neurons import parse_ranges

    if spec is None:
        return list(range(n_layers))
    return parse_ranges(spec, n_layers, "layer", "--layers")


def refuse_foreign_results(store) -> None:
    """Refuse a store holding explain/simulate/score results made from another recording (a results
    directory copied between stores), with the explain commands' own check and one-line error
    (client.results.ResultsGroup.check_recording), before anything is shown or written."""
    from client.results import ResultsGroup

    ResultsGroup.all(store.path)


def default_jobs(n_neurons: int) -> int:
    """Worker processes for a whole-store pass: one for small stores (spawning costs seconds)."""
    return 1 if n_neurons < 4096 else max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# A map over neurons. Each worker process opens the store itself and calls `fn(store, layer,
# index, arg)` (a module-level function, so that it pickles); workers write their own output
# files and return small results. Spawned, not forked: zarr keeps an event-loop thread.

_worker: dict = {}
PARALLEL_MIN = 256
"""Fewer neurons than this are done in this process whatever `jobs` says."""


def _init(store_path: str) -> None:
    from engine.store import open_store

    _worker["store"] = open_store(store_path)


def _run_block(fn, block, arg):
    s = _worker["store"]
    return [fn(s, layer, index, arg) for layer, index in block]


def map_neurons(store, items: list[tuple[int, int]], fn, arg, jobs: int, progress=None):
    """[fn(store, layer, index, arg) for (layer, index) in items], in order, on `jobs` processes.
    `progress(n)` is called as neurons finish."""
    if jobs <= 1 or len(items) < PARALLEL_MIN:
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


@contextmanager
def one_snapshot(store, label: str):
    """Around `view` or `export` of `store`: when a recording commits another checkpoint while
    they read an incomplete store, say so on stderr. Each neuron is whole, from one checkpoint,
    but they do not all come from the same one."""
    from engine.store import open_store

    before, complete = store.progress.get("checkpoint"), store.complete
    yield
    if complete:
        return
    try:
        now = open_store(store.path).progress.get("checkpoint")
    except UserError:
        return
    if now != before:
        print(f"{label}: warning: the recording committed a new checkpoint while this ran: neurons come from "
              "different checkpoints (each one whole); run it again once the recording has finished for one "
              "snapshot", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Output directories replaced whole


def _sweep_stale(out: Path) -> None:
    """Remove the staging and retired directories of runs that died (their pid is gone)."""
    for d in out.parent.glob(f".{out.name}.*-[0-9]*"):
        kind, _, pid = d.name.rpartition("-")
        if not (kind.endswith(".building") or kind.endswith(".old")) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass  # a live process (perhaps another user's): left alone


@contextmanager
def staged_output(out: Path, marker: str, what: str, owned: set[str] = frozenset()):
    """Yield a fresh directory beside `out` to build a whole output in (an atlas, an export). On
    success it replaces `out` (the old one is renamed away, then deleted); on any failure it is
    deleted and `out` stays as it was. A run that fails halfway thus never leaves a half-written
    output, nor a marker that describes another one. `out` must be new, empty, or an output of the
    same kind (it holds `marker`). Entries of the old `out` that the output does not own (`owned`:
    the names it writes at its top) are the user's, and move into the new one."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out '{out}' is a file, not a directory")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise UserError(f"--out '{out}' is a non-empty directory that is not a neuronatlas {what}; "
                            "choose a new or empty directory")
    stage = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(out)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write to '{out}': {exc.strerror or exc}") from None
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            try:
                os.replace(stage, out)
            except OSError:
                os.replace(old, out)  # put the old output back
                raise
            for entry in old.iterdir():  # the user's own files stay
                if entry.name not in owned and entry.name != marker and not (out / entry.name).exists():
                    os.replace(entry, out / entry.name)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise UserError(f"cannot write to '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
