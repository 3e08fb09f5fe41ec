"""Export to and import from the layout of OpenAI's published neuron data.

    DIR/collated-activations/{layer}/{neuron}.json   a NeuronRecord (JSON, `dataclass_name` tags)
    DIR/explanations/{layer}/{neuron}.jsonl          a NeuronSimulationResults (one line), if any

Export writes what the store's reader returns, field by field, in the published shape. Import reads
that layout into a new store with the same schema as a recorded one (written with engine.store's
own writer), so that `explain` and `score` work on published recordings. A published record holds
less than ours; docs/ATLAS.md says how each missing piece is filled. Round trip: exporting an
imported export gives the same files byte for byte.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.atlas import data
from engine.corpus import LONE_SURROGATE
from engine.errors import UserError

EXPORT_MARKER = "neuronatlas-export.json"
IMPORT_COUNT = 2**20
"""Token count given to imported moments. Published records carry mean, variance, skewness and
kurtosis but not the count; a power of two makes variance = M2 / count exact both ways."""
IMPORT_HIST_BINS = 32
MAX_LAYERS = 4096
MAX_NEURONS = 1 << 20
"""Bounds of an import: layers, and neurons per layer (the widest MLPs have under 10^5)."""
PAD_TOKEN = ""
"""Token string that pads shorter excerpts when published excerpts differ in length."""


# ---------------------------------------------------------------------------------------------
# Export


def _record(r) -> dict:
    return {"dataclass_name": "ActivationRecord", "tokens": list(r.tokens), "activations": list(r.activations)}


def _unpad(r, pad: str | None):
    if pad is None:
        return r
    n = len(r.tokens)
    while n and r.tokens[n - 1] == pad and r.activations[n - 1] == 0.0:
        n -= 1
    return type(r)(tokens=r.tokens[:n], activations=r.activations[:n], excerpt_id=r.excerpt_id)


def to_openai(rec, pad: str | None = None) -> dict:
    """A NeuronRecord in the published JSON shape (most negative excerpts have no field there)."""
    def recs(rs):
        return [_record(_unpad(r, pad)) for r in rs]

    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": rec.neuron_id.layer_index,
                      "neuron_index": rec.neuron_id.neuron_index},
        "random_sample": recs(rec.random_sample),
        "random_sample_by_quantile": [recs(b) for b in rec.random_sample_by_quantile],
        "quantile_boundaries": list(rec.quantile_boundaries),
        "mean": rec.mean,
        "variance": rec.variance,
        "skewness": rec.skewness,
        "kurtosis": rec.kurtosis,
        "most_positive_activation_records": recs(rec.most_positive_activation_records),
    }


def _dumps(obj) -> str:
    # NaN as the bare token NaN, like Python's json (OpenAI's loader reads it the same way).
    return json.dumps(obj, separators=(",", ":"))


def explanations_jsonl(store, layer: int, index: int) -> str | None:
    """The explanations file of a neuron: an imported file verbatim, with the store's own
    explanations (once the explain command writes them) appended as ScoredExplanations."""
    imported = data.imported_explanations_text(store, layer, index)
    own = [e for e in map(data.from_store_dict, store.explanations(layer, index)) if e is not None]
    if not own:
        return imported
    base = json.loads(imported.splitlines()[0]) if imported and imported.strip() else {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index},
        "scored_explanations": []}
    for e in own:
        base.setdefault("scored_explanations", []).append({
            "dataclass_name": "ScoredExplanation", "explanation": e.text,
            "scored_simulation": {"dataclass_name": "ScoredSimulation", "scored_sequence_simulations": [],
                                  "ev_correlation_score": e.score, "rsquared_score": None,
                                  "absolute_dev_explained_score": None}})
    return _dumps(base) + "\n"


def _export_one(store, layer: int, index: int, out: str) -> tuple[bool, bool]:
    """Worker: write one neuron's files; (written, explanations written)."""
    rec = store.neuron(layer, index)
    if data.is_absent(rec):
        return False, False
    pad = (store.run.get("imported") or {}).get("pad_token")
    path = Path(out) / "collated-activations" / str(layer) / f"{index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(to_openai(rec, pad)), encoding="utf-8")
    expl = explanations_jsonl(store, layer, index)
    if expl is not None:
        ep = Path(out) / "explanations" / str(layer) / f"{index}.jsonl"
        ep.parent.mkdir(parents=True, exist_ok=True)
        ep.write_text(expl, encoding="utf-8")
    return True, expl is not None


def export_openai(store, out: Path, layers: list[int] | None = None, jobs: int | None = None,
                  progress: bool = True) -> str:
    """Write `store` in OpenAI's published layout under `out`; returns a summary paragraph."""
    t0 = time.perf_counter()
    out = Path(out)
    if not store.progress.get("checkpoint"):
        raise UserError(f"store '{store.path}' holds no checkpoint yet: the recording has not reached its first one")
    data.refuse_foreign_results(store)  # before the old export is replaced
    layers = list(range(store.n_layers)) if layers is None else layers
    items = [(layer, i) for layer in layers for i in range(store.n_neurons[layer])]
    jobs = data.default_jobs(len(items)) if jobs is None else max(1, jobs)
    # Built beside --out and swapped in whole: a run that fails halfway (a damaged chunk) leaves the
    # previous export as it was.
    with data.staged_output(out, EXPORT_MARKER, "export", {"collated-activations", "explanations"}) as stage:
        update, close = data.progress_bar(len(items), "export", progress)
        try:
            res = data.map_neurons(store, items, _export_one, str(stage), jobs, update)
        finally:
            close()
        written = sum(1 for w, _ in res if w)
        expl = sum(1 for _, e in res if e)
        (stage / EXPORT_MARKER).write_text(json.dumps({
            "written_by": "neuronatlas export", "format": "openai", "store": str(store.path.resolve()),
            "model": store.run["model"].get("name"), "neurons": written, "explanations": expl,
            "layers": layers, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "omitted": "most_negative_activation_records and per-neuron statistics beyond the moments "
                       "(min, max, density, histogram) have no field in a published NeuronRecord",
        }, indent=2) + "\n")
    secs = time.perf_counter() - t0
    skipped = len(items) - written
    incomplete = "" if store.complete else " The recording is incomplete: this is its last checkpoint."
    return (f"Exported {written:,} neurons of {len(layers)} layers ({expl:,} with explanations) to "
            f"{out}/collated-activations in {secs:.1f} s"
            + (f"; skipped {skipped:,} neurons with no excerpts" if skipped else "") + "." + incomplete)


def cmd_export(args) -> int:
    from engine.store import open_store

    store = open_store(args.store)
    layers = data.parse_layers(args.layers, store.n_layers)
    with data.one_snapshot(store, "export"):
        print(export_openai(store, Path(args.out), layers, args.jobs, args.progress))
    return 0


# ---------------------------------------------------------------------------------------------
# Import


def find_layout(src: Path) -> tuple[Path, Path | None]:
    """(directory of layer directories with NeuronRecord files, explanations directory or None)."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"'{src}' is not a directory; give the directory that holds collated-activations/")
    for name in ("collated-activations", "neurons"):
        if (src / name).is_dir():
            expl = src / "explanations"
            return src / name, expl if expl.is_dir() else None
    if any(d.is_dir() and d.name.isdigit() for d in src.iterdir()):
        expl = src.parent / "explanations"
        return src, expl if expl.is_dir() else None
    raise UserError(f"'{src}' holds no collated-activations/ directory (nor layer directories 0/, 1/, ...); "
                    "expected DIR/collated-activations/LAYER/NEURON.json as OpenAI publishes it")


_NUMBER = re.compile(r"[0-9]+")


def _numbered(d: Path, suffix: str, what: str) -> dict[int, Path]:
    """The files NUMBER`suffix` of directory `d`, by number. Anything else in it (but hidden files,
    such as .DS_Store) is refused naming it, as is a number given twice ("7" and "07"): a record
    under a name that is not its number must not be skipped or overwritten in silence."""
    out: dict[int, Path] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        stem = p.name[: -len(suffix)] if p.name.endswith(suffix) else None
        if stem is None or not _NUMBER.fullmatch(stem) or not p.is_file():
            raise UserError(f"{p}: not a {what} file named NEURON{suffix} (a number, like 17{suffix}); "
                            "move it out of the directory and import again")
        index = int(stem)
        if index in out:
            raise UserError(f"{p}: {out[index].name} is neuron {index} too; keep one of them")
        out[index] = p
    return out


def _layer_dirs(d: Path, what: str) -> dict[int, Path]:
    """The layer directories (named by a number) of `d`; anything else but hidden files is refused."""
    out: dict[int, Path] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if not (_NUMBER.fullmatch(p.name) and p.is_dir()):
            raise UserError(f"{p}: not a layer directory (named by a number, like 0/) of {what}; "
                            "move it out of the directory and import again")
        layer = int(p.name)
        if layer in out:
            raise UserError(f"{p}: {out[layer].name}/ is layer {layer} too; keep one of them")
        out[layer] = p
    return out


class _Bad(Exception):
    pass


def _records(obj, what: str) -> list[tuple[list[str], np.ndarray]]:
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise _Bad(f"{what} is not a list of ActivationRecords")
    out = []
    for i, r in enumerate(obj):
        if not isinstance(r, dict) or not isinstance(r.get("tokens"), list) or not isinstance(r.get("activations"), list):
            raise _Bad(f"{what}[{i}] is not an ActivationRecord with 'tokens' and 'activations' lists")
        toks, acts = r["tokens"], r["activations"]
        if len(toks) != len(acts):
            raise _Bad(f"{what}[{i}] has {len(toks)} tokens but {len(acts)} activations")
        if not toks:
            raise _Bad(f"{what}[{i}] is empty")
        if not all(isinstance(t, str) for t in toks):
            raise _Bad(f"{what}[{i}] has a token that is not a string")
        bad = next((t for t in toks if LONE_SURROGATE.search(t)), None)
        if bad is not None:  # UTF-8 cannot hold it: the vocabulary would keep "?" in its place
            raise _Bad(f"{what}[{i}] has a token with an unpaired surrogate ({bad!r}), which is not Unicode text")
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in acts):
            bad = next(a for a in acts if not (isinstance(a, (int, float)) and not isinstance(a, bool)))
            raise _Bad(f"{what}[{i}] has an activation that is not a number ({json.dumps(bad)[:20]})")
        try:
            values = np.array(acts, dtype=np.float64)
        except OverflowError:  # a whole number beyond float64
            values = np.array([float("inf")])
        if not np.isfinite(values).all():
            bad = float(values[~np.isfinite(values)][0])
            raise _Bad(f"{what}[{i}] has an activation that is not a finite number "
                       f"({'NaN' if math.isnan(bad) else ('-' if bad < 0 else '') + 'Infinity'})")
        out.append((toks, values))
    return out


def _float(obj, key: str) -> float:
    v = obj.get(key)
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(f"'{key}' is not a number")
    return float(v)


def parse_record(path: Path, layer: int, index: int) -> dict:
    """One published NeuronRecord file, checked; raises UserError naming the file and the problem."""
    try:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise _Bad("is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise _Bad(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        except RecursionError:
            raise _Bad("is JSON nested too deeply to read") from None
        except ValueError:  # an integer literal beyond Python's limit of 4,300 digits
            raise _Bad("holds a number too long to read (an integer of more than 4,300 digits)") from None
        if not isinstance(obj, dict):
            raise _Bad("is not a JSON object")
        if obj.get("dataclass_name", "NeuronRecord") != "NeuronRecord":
            raise _Bad(f"is a {obj.get('dataclass_name')!r}, not a NeuronRecord")
        if not isinstance(obj.get("most_positive_activation_records"), list):
            raise _Bad("has no most_positive_activation_records list")
        nid = obj.get("neuron_id")
        if nid is not None and not isinstance(nid, dict):
            raise _Bad("has a neuron_id that is not an object")
        for key, want in (("layer_index", layer), ("neuron_index", index)):
            got = (nid or {}).get(key, want)
            if isinstance(got, bool) or not isinstance(got, int):
                raise _Bad(f"has a neuron_id.{key} that is not an integer ({json.dumps(got)[:20]})")
            if got != want:
                raise _Bad(f"has neuron_id layer {(nid or {}).get('layer_index')} neuron "
                           f"{(nid or {}).get('neuron_index')}, but its path says layer {layer} neuron {index}")
        quant = obj.get("random_sample_by_quantile") or []
        if not isinstance(quant, list):
            raise _Bad("random_sample_by_quantile is not a list of lists")
        bounds = obj.get("quantile_boundaries") or []
        if not isinstance(bounds, list) or not all(
                b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in bounds):
            raise _Bad("quantile_boundaries is not a list of numbers")
        top = _records(obj.get("most_positive_activation_records"), "most_positive_activation_records")
        maxima = [float(a.max()) for _, a in top]
        if any(b > a for a, b in zip(maxima, maxima[1:])):
            k = next(k for k in range(len(maxima) - 1) if maxima[k + 1] > maxima[k])
            raise _Bad(f"most_positive_activation_records are not in decreasing order of their maximum "
                       f"(record {k + 1}: {maxima[k + 1]:g} after {maxima[k]:g}); their rank sets the splits")
        return {
            "top": top,
            "random": _records(obj.get("random_sample"), "random_sample"),
            "quant": [_records(b, f"random_sample_by_quantile[{q}]") for q, b in enumerate(quant)],
            "bounds": [math.nan if b is None else float(b) for b in bounds],
            "stats": [_float(obj, k) for k in ("mean", "variance", "skewness", "kurtosis")],
        }
    except _Bad as exc:
        raise UserError(f"{path}: {exc}; expected an OpenAI NeuronRecord (see docs/ATLAS.md)") from None


def moments_for(mean: float, var: float, skew: float, kurt: float, count: int = IMPORT_COUNT) -> np.ndarray:
    """(mean, M2, M3, M4) from which the reader's moment_stats gives back exactly (mean, variance,
    skewness, kurtosis) for `count` tokens: invert its formulas, then step M3 and M4 by a few ulps
    until its floating-point results match bit for bit (they almost always do at once)."""
    from kernels.reference import moment_stats

    m2 = var * count
    if not m2 > 0:
        return np.array([mean, m2, 0.0, 0.0])
    m3 = skew * m2**1.5 / math.sqrt(count)
    m4 = (kurt + 3.0) * (m2 * m2) / count

    def stats(m3_, m4_):
        s = moment_stats(count, np.array([[mean, m2, m3_, m4_]], dtype=np.float64))
        return float(s["skewness"][0]), float(s["kurtosis"][0])

    for target, k in ((skew, 0), (kurt, 1)):
        if not math.isfinite(target):
            continue
        for _ in range(16):
            got = stats(m3, m4)[k]
            if got == target or not math.isfinite(got):
                break
            direction = math.inf if got < target else -math.inf  # both formulas increase with M3, M4
            if k == 0:
                m3 = float(np.nextafter(m3, direction))
            else:
                m4 = float(np.nextafter(m4, direction))
    return np.array([mean, m2, m3, m4])


class _Excerpts:
    """Distinct excerpts (by token sequence) and the vocabulary of distinct token strings; rows
    spill to a temporary file so that a whole model's excerpts need not fit in memory."""

    def __init__(self, work: Path):
        self.vocab: dict[str, int] = {}
        self.ids: dict[bytes, int] = {}
        self.lengths: list[int] = []
        self.file = open(work / "tokens.bin", "wb")
        self.path = work / "tokens.bin"

    def add(self, tokens: list[str]) -> int:
        key = hashlib.blake2b(json.dumps(tokens).encode("utf-8", "surrogatepass"), digest_size=16).digest()
        eid = self.ids.get(key)
        if eid is None:
            eid = self.ids[key] = len(self.lengths)
            vocab = self.vocab
            row = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokens), dtype=np.int32, count=len(tokens))
            self.file.write(row.tobytes())
            self.lengths.append(len(tokens))
        return eid

    def rows(self, T: int, pad_id: int, block: int = 65536):
        """(start, [block, T] int32 rows), padded with pad_id."""
        self.file.close()
        flat = np.fromfile(self.path, dtype=np.int32)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for b in range(0, len(lengths), block):
            n = min(block, len(lengths) - b)
            out = np.full((n, T), pad_id, dtype=np.int32)
            for j in range(n):
                s, e = starts[b + j], starts[b + j + 1]
                out[j, : e - s] = flat[s:e]
            yield b, out


def _hist(maxima: np.ndarray, bins: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Counts (underflow, bins, overflow) of `maxima` over their own range, binned as the recorder bins."""
    counts = np.zeros(bins + 2, dtype=np.int64)
    x = maxima[np.isfinite(maxima)]
    if not len(x):
        return counts, (math.nan, math.nan)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:  # one value: a range around it that its magnitude does not swallow (1e17 + 0.5 == 1e17)
        pad = max(0.5, abs(lo) * 2.0**-20)
        lo, hi = lo - pad, hi + pad
        lo = lo if math.isfinite(lo) else float(x.min())  # at the float64 limit the value itself
        hi = hi if math.isfinite(hi) else float(x.max())  # is the bound (the other one is padded)
    if math.isfinite(hi - lo):
        f = (x - lo) / (hi - lo) * bins
    else:  # a span beyond float64 (-1e308 .. 1e308): halves do not overflow
        f = (x / 2 - lo / 2) / (hi / 2 - lo / 2) * bins
    b = 1 + np.clip(np.floor(f), 0, bins - 1).astype(np.int64)
    counts += np.bincount(b, minlength=bins + 2)
    return counts, (lo, hi)


def _memory_budget() -> int:
    """Bytes one layer's arrays may take: half the memory available now (4 GiB where unknown)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _layer_arrays(neurons: dict[int, dict], n: int, ex: _Excerpts, dtype: str, layer: int = 0) -> tuple[dict, int, str]:
    """One layer's checkpoint arrays (engine.store's names) from parsed records; also its longest
    excerpt and the activation dtype used."""
    recs = list(neurons.values())
    K = max((len(r["top"]) for r in recs), default=0)
    R = max((len(r["random"]) for r in recs), default=0)
    Q = max((len(r["quant"]) for r in recs), default=0)
    S = max((len(b) for r in recs for b in r["quant"]), default=0)
    B = max((len(r["bounds"]) for r in recs), default=0)
    T = max((len(t) for r in recs for group in [r["top"], r["random"], *r["quant"]] for t, _ in group), default=1)
    every = [a for r in recs for group in [r["top"], r["random"], *r["quant"]] for _, a in group]
    # Every record of a layer has the same quantile buckets and boundaries (as a recording's do):
    # padded to the longest, a record with fewer would be exported with buckets it never had.
    for what, size, want in (("quantile buckets", lambda r: len(r["quant"]), Q),
                             ("quantile boundaries", lambda r: len(r["bounds"]), B)):
        odd = next((i for i, r in neurons.items() if size(r) != want), None)
        if odd is not None:
            raise UserError(f"layer {layer}: neuron {odd} has {size(neurons[odd])} {what} where others have {want}; "
                            "the records of a layer must agree")
    if dtype == "auto":  # float32 only when it keeps every value exactly (so within its range)
        with np.errstate(over="ignore"):  # a value beyond float32's range is simply not exact there
            exact = all(np.array_equal(a.astype(np.float32).astype(np.float64), a, equal_nan=True) for a in every)
        dtype = "float32" if exact else "float64"
    else:  # asked for: it may round, but must not make a value infinite
        with np.errstate(over="ignore"):
            big = next((float(a[~np.isfinite(a.astype(dtype))][0]) for a in every
                        if not np.isfinite(a.astype(dtype)).all()), None)
        if big is not None:
            raise UserError(f"layer {layer}: an activation ({big:g}) is beyond the range of {dtype}; import with "
                            "--dtype float64 (or auto)")
    adt = np.dtype(dtype)
    need = n * ((K + R + Q * S) * T * adt.itemsize + (K + R) * 8 + Q * S * 16 + B * 8 + (IMPORT_HIST_BINS + 2) * 8
                + 128)
    if need > _memory_budget():
        raise UserError(f"layer {layer}: its neuron numbers go up to {n - 1:,}, so the store would hold {n:,} neurons "
                        f"of which {len(recs):,} have a record ({need / 2**30:.1f} GiB for the layer, more than this "
                        "machine can hold): check the file names, or import the neurons in smaller groups")
    A = {
        "top_max": np.full((n, K), -np.inf, dtype=adt), "top_ids": np.full((n, K), -1, dtype=np.int64),
        "top_acts": np.zeros((n, K, T), dtype=adt),
        "random_acts": np.zeros((n, R, T), dtype=adt), "random_ids": np.full((n, R), -1, dtype=np.int64),
        "prefix_max": np.full((n, 1), np.nan, dtype=np.float32),
        "quant_bounds": np.full((n, B), np.nan, dtype=np.float64),
        "quant_prio": np.full((n, Q, S), np.iinfo(np.int64).max, dtype=np.int64),
        "quant_ids": np.full((n, Q, S), -1, dtype=np.int64), "quant_acts": np.zeros((n, Q, S, T), dtype=adt),
        "hist": np.zeros((n, IMPORT_HIST_BINS + 2), dtype=np.int64),
        "hist_range": np.full((n, 2), np.nan, dtype=np.float64),
        "moments": np.full((n, 4), np.nan, dtype=np.float64),
        "stats": np.full((n, 4), np.nan, dtype=np.float64),
        "amin": np.full((n,), np.nan, dtype=adt), "amax": np.full((n,), np.nan, dtype=adt),
        "n_positive": np.zeros((n,), dtype=np.int64),
    }
    for i, r in neurons.items():
        for k, (toks, a) in enumerate(r["top"]):
            A["top_ids"][i, k] = ex.add(toks)
            A["top_acts"][i, k, : len(a)] = a
            A["top_max"][i, k] = np.nanmax(a) if np.isfinite(a).any() else np.nan
        for k, (toks, a) in enumerate(r["random"]):
            A["random_ids"][i, k] = ex.add(toks)
            A["random_acts"][i, k, : len(a)] = a
        for q, bucket in enumerate(r["quant"]):
            for k, (toks, a) in enumerate(bucket):
                A["quant_ids"][i, q, k] = ex.add(toks)
                A["quant_acts"][i, q, k, : len(a)] = a
                A["quant_prio"][i, q, k] = k
        A["quant_bounds"][i, : len(r["bounds"])] = r["bounds"]
        A["moments"][i] = moments_for(*r["stats"])
        A["stats"][i] = r["stats"]  # what the reader returns: moments_for matches it only to an ulp
        # The maximum of the top excerpts is the neuron's maximum; the minimum is not known.
        top = np.concatenate([a for _, a in r["top"]]) if r["top"] else np.zeros(0)
        A["amax"][i] = np.nanmax(top) if np.isfinite(top).any() else np.nan
        # Density and histogram from the uniform random sample (all records when there is none).
        sample = r["random"] or [x for group in [r["top"], *r["quant"]] for x in group]
        if sample:
            vals = np.concatenate([a for _, a in sample])
            A["n_positive"][i] = round(float(np.mean(vals > 0)) * IMPORT_COUNT)
            A["hist"][i], A["hist_range"][i] = _hist(np.array([np.nanmax(a) if np.isfinite(a).any() else np.nan
                                                               for _, a in sample]), IMPORT_HIST_BINS)
    return A, T, dtype


def _pad_t(a: np.ndarray, T: int) -> np.ndarray:
    if a.ndim >= 3 and a.shape[-1] < T:
        pad = [(0, 0)] * (a.ndim - 1) + [(0, T - a.shape[-1])]
        return np.pad(a, pad)
    return a


def import_openai(src: Path, out: Path, dtype: str = "auto", quantile_probs: list[float] | None = None,
                  progress: bool = True) -> str:
    """Read published NeuronRecords under `src` into a new store at `out`; returns a summary."""
    from engine import store as st

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    collated, expl_dir = find_layout(src)
    layer_dirs = _layer_dirs(collated, "NeuronRecords")
    files = {layer: _numbered(d, ".json", "NeuronRecord") for layer, d in layer_dirs.items()}
    files = {layer: f for layer, f in files.items() if f}
    n_files = sum(len(f) for f in files.values())
    if not n_files:
        raise UserError(f"'{collated}' holds no LAYER/NEURON.json files; expected OpenAI's collated-activations layout")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out '{out}' is a file, not a directory")
        if any(out.iterdir()):
            what = "a neuronatlas store" if st.is_store(out) else "a non-empty directory"
            raise UserError(f"--out '{out}' is already {what}; import into a new or empty directory")
    n_layers = max(files) + 1
    n_neurons = [max(files[layer]) + 1 if layer in files else 0 for layer in range(n_layers)]
    # Neuron numbers index dense arrays: a stray name ("0/1000000000.json") must not ask for a
    # store of that many neurons. No language model has layers or MLP widths near these bounds.
    if n_layers > MAX_LAYERS:
        raise UserError(f"{layer_dirs[n_layers - 1]}: layer {n_layers - 1:,} is beyond any model's depth (at most "
                        f"{MAX_LAYERS:,} layers are imported); check the directory names")
    wide = [layer for layer in files if n_neurons[layer] > MAX_NEURONS]
    if wide:
        path = files[wide[0]][n_neurons[wide[0]] - 1]
        raise UserError(f"{path}: neuron {n_neurons[wide[0]] - 1:,} is beyond any model's MLP width (at most "
                        f"{MAX_NEURONS:,} neurons per layer are imported); check the file names")

    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # Named with this process's id: a later import removes what a killed one left.
        st.remove_stale(parent, ".import-work-")
        st.remove_stale(parent, f".{out.name}.importing-")
        work = Path(tempfile.mkdtemp(prefix=f".import-work-{os.getpid()}-", dir=parent))
        build = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise UserError(f"cannot write next to '{out}': {exc.strerror or exc}") from None
    ex = None
    try:
        expl_files = _explanation_files(expl_dir) if expl_dir else []
        ex = _Excerpts(work)
        update, close = data.progress_bar(n_files, "import", progress)
        layer_meta = []
        dtypes = set()
        try:
            for layer in range(n_layers):
                parsed = {}
                for index, path in sorted(files.get(layer, {}).items()):
                    parsed[index] = parse_record(path, layer, index)
                    if update:
                        update(1)
                arrays, T_l, dt = _layer_arrays(parsed, n_neurons[layer], ex, dtype, layer)
                if parsed:
                    dtypes.add(dt)
                np.savez(work / f"layer{layer}.npz", **arrays)
                layer_meta.append({"T": T_l, "K": arrays["top_ids"].shape[1], "R": arrays["random_ids"].shape[1],
                                   "Q": arrays["quant_ids"].shape[1], "S": arrays["quant_ids"].shape[2],
                                   "B": arrays["quant_bounds"].shape[1]})
        finally:
            close()
        lengths = set(ex.lengths)
        T = max(lengths) if lengths else 1
        padded = len(lengths) > 1
        vocab = list(ex.vocab)
        pad_id = -1
        if padded:
            pad_id = ex.vocab.setdefault(PAD_TOKEN, len(ex.vocab))
            vocab = list(ex.vocab)
        B = max((m["B"] for m in layer_meta), default=0)
        if quantile_probs is not None and len(quantile_probs) != B:
            raise UserError(f"--quantile-probs gives {len(quantile_probs)} quantiles but the records have "
                            f"{B} quantile boundaries")
        probs = list(quantile_probs) if quantile_probs is not None else [None] * B
        act_dtype = "float64" if "float64" in dtypes else "float32"
        spec = {"excerpt_len": T, "top_k": max((m["K"] for m in layer_meta), default=0), "negatives": False,
                "random_k": max((m["R"] for m in layer_meta), default=0), "quantile_probs": probs,
                "quantile_k": max((m["S"] for m in layer_meta), default=0), "quantile_prefix": 0,
                "hist_bins": IMPORT_HIST_BINS, "seed": None}
        n_ex = len(ex.lengths)
        source = str(src.resolve())
        imported = {
            "format": "openai", "source": source, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "neurons": n_files, "moment_count": IMPORT_COUNT, "padded": padded,
            "pad_token": PAD_TOKEN if padded else None,
            "histogram_note": "Histogram of the random sample's excerpt maxima (published records carry no "
                              "histogram), not of the whole corpus.",
            "atlas_notes": ["Imported recording: density and histogram are estimated from the random sample; "
                            "the minimum is unknown; the maximum is that of the top excerpts."],
            "filled": {"min": "NaN (unknown)", "max": "maximum over most_positive_activation_records",
                       "frac_positive": "fraction of positive activations in the neuron's random sample",
                       "histogram": "excerpt maxima of the neuron's random sample",
                       "count": f"{IMPORT_COUNT} (moments stored so that the reader returns the published values)",
                       "quantile_probs": "from --quantile-probs" if quantile_probs is not None else "unknown (null)"},
        }
        run = {
            "identity": {"imported": source},
            "model": {"name": f"imported: {src.resolve().name}", "gguf_file": None, "revision": None,
                      "model_type": "unknown", "architecture": "unknown (imported, no weights)",
                      "n_layers": n_layers, "n_neurons": n_neurons, "weights": None},
            "tokenizer": None, "dtype": act_dtype,
            "corpus": {"source": "imported OpenAI-format neuron records", "path": source},
            "excerpt_len": T, "spec": spec, "bos": False, "seed": None, "n_excerpts": n_ex,
            "n_layers": n_layers, "n_neurons": n_neurons, "imported": imported,
        }
        root = st.create_store(build, run, (n_ex, T), vocab)
        for start, rows in ex.rows(T, pad_id):
            st.write_tokens(root, start, rows)

        def layers():
            for layer in range(n_layers):
                with np.load(work / f"layer{layer}.npz") as z:
                    arrays = {k: _pad_t(z[k], T) for k in z.files}
                yield arrays, IMPORT_COUNT, True

        st.write_checkpoint(build, 1, layers(), np.full(spec["random_k"], -1, dtype=np.int64), n_ex, True,
                            n_layers, False)
        # An explanation of a neuron that has no record here (a subset of the records imported)
        # has nothing to attach to: left out, and counted in the summary.
        orphans = [f for layer, index, f in expl_files if index not in files.get(layer, {})]
        expl_files = [(layer, index, f) for layer, index, f in expl_files if index in files.get(layer, {})]
        if expl_files:
            data.write_imported_explanations(root, expl_files)
        n_expl = len(expl_files)
        if out.exists():
            out.rmdir()
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
        if ex is not None:
            ex.file.close()
        shutil.rmtree(work, ignore_errors=True)
    secs = time.perf_counter() - t0
    skipped = f"; {len(orphans):,} explanation files of neurons without a record left out" if orphans else ""
    return (f"Imported {n_files:,} neurons in {sum(1 for n in n_neurons if n)} layers ({n_expl:,} with "
            f"explanations{skipped}) from {collated}: {n_ex:,} distinct excerpts of up to {T} tokens, a vocabulary of "
            f"{len(vocab):,} token strings{', shorter excerpts padded' if padded else ''}; store {out} in "
            f"{secs:.1f} s. It holds no model weights: use it with explain and score, not record.")


def _explanation_files(expl_dir: Path) -> list[tuple[int, int, Path]]:
    """The published explanation files (layer, neuron, path), each checked."""
    out = []
    for layer, d in sorted(_layer_dirs(expl_dir, "explanations").items()):
        for index, f in sorted(_numbered(d, ".jsonl", "NeuronSimulationResults").items()):
            try:
                text = f.read_text(encoding="utf-8")
                data.parse_openai_explanations(text)
                ids = [json.loads(line).get("neuron_id") for line in text.splitlines() if line.strip()]
            except data.BadExplanations as exc:
                raise UserError(f"{f}: {exc}; expected OpenAI's explanations layout (see docs/ATLAS.md)") from None
            except (ValueError, AttributeError, TypeError, RecursionError):
                raise UserError(f"{f}: not a NeuronSimulationResults JSON line; expected OpenAI's explanations "
                                "layout (see docs/ATLAS.md)") from None
            for nid in ids:
                if isinstance(nid, dict) and (nid.get("layer_index", layer), nid.get("neuron_index", index)) != (layer, index):
                    raise UserError(f"{f}: has neuron_id layer {nid.get('layer_index')} neuron "
                                    f"{nid.get('neuron_index')}, but its path says layer {layer} neuron {index}")
            out.append((layer, index, f))
    return out


def _probs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        probs = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--quantile-probs '{text}' is not a comma-separated list of numbers") from None
    if not all(0 < p < 1 for p in probs) or probs != sorted(probs):
        raise UserError(f"--quantile-probs '{text}' must be increasing numbers between 0 and 1")
    return probs


def cmd_import(args) -> int:
    print(import_openai(Path(args.dir), Path(args.out), args.dtype, _probs(args.quantile_probs), args.progress))
    return 0
