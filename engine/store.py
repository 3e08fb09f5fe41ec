"""The Zarr store of a run: its schema, its writer and its reader (`open_store`).

The schema is documented in docs/STORE.md; this module is its only implementation. A store is a
Zarr v3 group. Per-neuron state lives in checkpoint generations (`checkpoints/gNNNNNN`); the root
attribute `progress.checkpoint` names the committed one. A checkpoint is written in full under a
new name and only then committed by rewriting the root metadata (zarr writes each key with an
atomic rename), so a reader always sees one whole checkpoint, never half of one. A generation is
never changed once committed; it is removed by first renaming it away (atomic), so a reader that
finds it still in place after reading knows that everything it read was whole (see `Store`).
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import json
import math
import os
import shutil
import threading
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from engine.errors import UserError

FORMAT = "neuronatlas"
FORMAT_VERSION = 1
SPLITS = ("train", "calibration", "valid", "test")
"""Top excerpts are dealt to these splits by rank (rank r -> SPLITS[r % 4]), as in the paper."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _blosc(itemsize: int):
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=itemsize)


def _open_root(path: Path, mode: str):
    import zarr

    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def is_store(path: Path) -> bool:
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return _open_root(path, "r").attrs.get("format") == FORMAT
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Writing


EVERY_CHUNK = "every_chunk_written"
"""Array attribute: all chunk files exist (arrays written before it may lack all-zero chunks)."""


def write_array(group, name: str, data: np.ndarray, attrs: dict, dims: tuple[str, ...]):
    """Write `data` neuron-major. Large arrays: shards of 512 neurons holding inner chunks of 8
    (a neuron's slice is one read of one small chunk; one chunk per neuron wrote 3-4x slower
    and read no faster, see docs/STORE.md). Small arrays: one chunk per block of neurons."""
    data = np.ascontiguousarray(data)
    shape = data.shape
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * data.itemsize if len(shape) > 1 else data.itemsize
    kw = {}
    if len(shape) > 1 and row_bytes >= 2048 and shape[0] > 1:
        c = min(shape[0], 8)
        kw["chunks"] = (c, *shape[1:])
        kw["shards"] = (min(512, c * -(-shape[0] // c)), *shape[1:])
    else:
        rows = max(1, min(shape[0] if shape else 1, (1 << 20) // max(row_bytes, 1)))
        kw["chunks"] = (rows, *shape[1:]) if shape else ()
    # Every chunk is written, zeros too, so that a chunk file gone missing reads as damage
    # (`_Checked`), not as the fill value: zarr skips chunks equal to it by default.
    arr = group.create_array(
        name, shape=shape, dtype=data.dtype, compressors=_blosc(data.itemsize),
        attributes={**attrs, EVERY_CHUNK: True}, dimension_names=dims,
        fill_value=0 if data.dtype.kind in "iuf" else None, overwrite=True,
        config={"write_empty_chunks": True}, **kw,
    )
    arr[...] = data
    return arr


def create_store(path: Path, run: dict, tokens_shape: tuple[int, int], vocab: list[str]):
    """A new empty store at `path` (a fresh or empty directory), made whole or not at all: it is
    built beside `path` and renamed into place, so that a run killed (or a disk filled) while
    creating leaves no half store that a rerun would take for one to resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(path)
    build = path.parent / f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_store(build, run, tokens_shape, vocab)
        try:
            os.rename(build, path)  # replaces an empty directory, never a non-empty one
        except OSError as exc:
            if path.is_dir() and any(path.iterdir()):
                raise UserError(f"'{path}' was filled by another process while this run created its store; "
                                "run the same command again to resume it") from None
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _open_root(path, "r+")


def _remove_stale_builds(path: Path) -> None:
    """Remove what a killed creation of `path` left beside it (its process is gone)."""
    remove_stale(path.parent, f".{path.name}.creating-")


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove the directories `parent/PREFIX{pid}-...` whose process is gone: what a run killed
    while building (SIGKILL, a power cut) left behind."""
    import glob

    for d in Path(parent).glob(glob.escape(prefix) + "*"):
        try:
            pid = int(d.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            pass  # not ours, or a live process (perhaps another user's): left alone


@contextmanager
def exclusive(path, busy: str, flags: int = os.O_RDONLY):
    """Hold an exclusive flock on `path` (opened with `flags`) for the block; UserError(`busy`)
    when another process holds it. Released when the process ends, however it ends."""
    import fcntl

    fd = os.open(path, flags, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(busy) from None
            raise
        yield
    finally:
        os.close(fd)


def writer_lock(path: Path):
    """Hold the store at `path` for one recording: a second `record` on it is refused while this
    one runs (two writers would interleave token rows and remove each other's checkpoints). An
    flock on the store's directory."""
    return exclusive(path, f"another neuronatlas run is recording into '{path}': wait for it to finish or stop it "
                           "(Ctrl-C), then run the same command to resume", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _build_store(path: Path, run: dict, tokens_shape: tuple[int, int], vocab: list[str]) -> None:
    root = _open_root(path, "w")
    root.attrs.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _now(),
        "run": run,
        "progress": {"excerpts_done": 0, "checkpoint": None, "generation": 0, "complete": False,
                     "updated": _now()},
    })
    n, T = tokens_shape
    root.create_array(
        "tokens", shape=(n, T), dtype=np.int32, chunks=(max(1, min(n, 4096)), T),
        compressors=_blosc(4), fill_value=-1, dimension_names=("excerpt", "token"),
        attributes={"description": "token ids of excerpt i (row i); -1 where not yet recorded"},
    )
    enc = [s.encode("utf-8", errors="replace") for s in vocab]
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in enc])
    vg = root.create_group("vocab", attributes={
        "description": "token strings: bytes[offsets[i]:offsets[i+1]] is token id i, UTF-8"})
    write_array(vg, "bytes", np.frombuffer(b"".join(enc), dtype=np.uint8).copy(), {}, ("byte",))
    write_array(vg, "offsets", offsets, {}, ("token_id",))
    root.create_group("checkpoints")


def write_tokens(root, start: int, tokens: np.ndarray) -> None:
    root["tokens"][start : start + len(tokens)] = tokens


def _layer_arrays(state: dict[str, np.ndarray], negatives: bool):
    """(name, array, dims, description) of one layer's checkpoint, in writing order."""
    out = [
        ("top_max", state["top_max"], ("neuron", "rank"), "excerpt maximum, descending; -inf = empty"),
        ("top_ids", state["top_ids"], ("neuron", "rank"), "excerpt id; -1 = empty"),
        ("top_acts", state["top_acts"], ("neuron", "rank", "token"), "per-token activations"),
    ]
    if negatives:
        out += [
            ("neg_min", state["neg_min"], ("neuron", "rank"), "excerpt minimum, ascending; +inf = empty"),
            ("neg_ids", state["neg_ids"], ("neuron", "rank"), "excerpt id; -1 = empty"),
            ("neg_acts", state["neg_acts"], ("neuron", "rank", "token"), "per-token activations"),
        ]
    out += [
        ("random_acts", state["random_acts"], ("neuron", "slot", "token"),
         "activations of the run's random sample (ids in checkpoint array random_ids)"),
    ]
    if "random_ids" in state:  # optional (imported stores): each neuron's own random sample
        out += [("random_ids", state["random_ids"], ("neuron", "slot"),
                 "this neuron's random sample excerpt ids, preferred over the checkpoint's; -1 = empty")]
    if "stats" in state:  # optional (imported stores): published statistics, preferred over moments
        out += [("stats", state["stats"], ("neuron", "stat"), "mean, variance, skewness, kurtosis as published")]
    out += [
        ("prefix_max", state["prefix_max"], ("neuron", "prefix_excerpt"),
         "maxima of the prefix excerpts while the prefix is incomplete"),
        ("quant_bounds", state["quant_bounds"], ("neuron", "boundary"), "quantile bucket boundaries; NaN = not set"),
        ("quant_ids", state["quant_ids"], ("neuron", "bucket", "slot"), "sampled excerpt ids; -1 = empty"),
        ("quant_prio", state["quant_prio"], ("neuron", "bucket", "slot"), "sampling priority of those excerpts"),
        ("quant_acts", state["quant_acts"], ("neuron", "bucket", "slot", "token"), "per-token activations"),
        ("hist", state["hist"], ("neuron", "bin"), "counts of excerpt maxima: underflow, bins, overflow"),
        ("hist_range", state["hist_range"], ("neuron", "lo_hi"), "range of the regular bins"),
        ("moments", state["moments"], ("neuron", "moment"), "running mean, M2, M3, M4 (sums of (x-mean)^k)"),
        ("amin", state["amin"], ("neuron",), "minimum activation"),
        ("amax", state["amax"], ("neuron",), "maximum activation"),
        ("n_positive", state["n_positive"], ("neuron",), "tokens with activation > 0"),
    ]
    return out


def _remove_generations(path: Path, keep: Iterable[str]) -> None:
    """Remove every directory under `checkpoints/` but those named in `keep`. Each is first renamed
    away in one atomic step, then deleted: a reader never meets a generation half deleted."""
    ckdir = Path(path) / "checkpoints"
    if not ckdir.is_dir():
        return
    keep = set(keep)
    for old in list(ckdir.iterdir()):
        if not old.is_dir() or old.name in keep:
            continue
        doomed = old
        if not old.name.startswith(_DELETING):
            doomed = ckdir / f"{_DELETING}{old.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(old, doomed)
            except OSError:
                doomed = old
        shutil.rmtree(doomed, ignore_errors=True)


_DELETING = "deleting-"
"""Prefix of a generation renamed away on its way to deletion."""


def _committed_name(root) -> str | None:
    committed = (root.attrs.get("progress") or {}).get("checkpoint")
    return committed.split("/")[-1] if committed else None


def write_checkpoint(path: Path, generation: int, layers: "Iterable[tuple[dict, int, bool]]",
                     random_ids: np.ndarray, excerpts_done: int, complete: bool, n_layers: int,
                     negatives: bool, keep_previous: bool = False) -> None:
    """Write generation `generation` in full, then commit it and drop older generations.

    `layers` yields, per layer in order, (host arrays, token count, bounds_ready). With
    `keep_previous` (the periodic checkpoints of a running recording) the generation committed
    before this one stays until the next checkpoint starts, so that a reader that opened the store
    just before this commit can finish reading it; the disk then holds two generations between
    checkpoints, as it does while one is written.
    """
    root = _open_root(path, "r+")
    name = f"g{generation:06d}"
    previous = _committed_name(root)
    # Older generations (kept for readers by the last checkpoint, or left by a killed run) go
    # before the new one is written: the disk never holds more than two.
    _remove_generations(path, keep=[previous] if previous else [])
    ck = root["checkpoints"].create_group(name, overwrite=True, attributes={
        "generation": generation, "excerpts_done": excerpts_done, "complete": complete,
        "written": _now(), "n_layers": n_layers})
    write_array(ck, "random_ids", random_ids, {"description": "random sample excerpt ids; -1 = empty"}, ("slot",))
    lg = ck.create_group("layers")
    for layer, (arrays, count, ready) in enumerate(layers):
        g = lg.create_group(f"{layer:03d}", attributes={"count": int(count), "bounds_ready": bool(ready)})
        for aname, data, dims, desc in _layer_arrays(arrays, negatives):
            write_array(g, aname, data, {"description": desc}, dims)
    # Commit: one atomic rewrite of the root metadata names the new generation.
    progress = dict(root.attrs["progress"])
    progress.update({"excerpts_done": excerpts_done, "checkpoint": f"checkpoints/{name}",
                     "generation": generation, "complete": complete, "updated": _now()})
    root.attrs["progress"] = progress
    _remove_generations(path, keep=[name, previous] if keep_previous and previous else [name])


def read_checkpoint(path: Path, checkpoint: str, negatives: bool) -> tuple[list[tuple[dict, int, bool]], np.ndarray]:
    """A committed checkpoint back in memory: per layer (arrays, token count, bounds_ready), and
    the random sample's excerpt ids."""
    try:
        return _read_checkpoint(path, checkpoint, negatives)
    except UserError:
        raise
    except _DAMAGE as exc:
        raise _damaged(path, exc) from None


def _read_checkpoint(path: Path, checkpoint: str, negatives: bool) -> tuple[list[tuple[dict, int, bool]], np.ndarray]:
    ck = _open_root(path, "r")[checkpoint]
    names = [name for name, *_ in _layer_arrays({k: None for k in _ALL}, negatives)]
    layers = []
    for layer in range(int(ck.attrs["n_layers"])):
        g = _OpenLayer(ck[f"layers/{layer:03d}"])
        layers.append(({name: np.asarray(g[name][...]) for name in names}, int(g.attrs["count"]),
                       bool(g.attrs["bounds_ready"])))
    return layers, np.asarray(_checked(ck["random_ids"])[...])


_ALL = ("top_max top_ids top_acts neg_min neg_ids neg_acts random_acts prefix_max quant_bounds "
        "quant_ids quant_prio quant_acts hist hist_range moments amin amax n_positive").split()


def check_recorded(path: Path, done: int) -> None:
    """UserError (damaged) unless the tokens of excerpts [0, done) and the vocabulary are all in
    place: a resumed or complete recording does not write them again, and a reader needs them. A
    stat per tokens chunk file, and the vocabulary read whole (small)."""
    try:
        root = _open_root(path, "r")
        tokens = root["tokens"]
        rows = tokens.metadata.chunk_grid.chunk_shape[0]
        for r in range(-(-done // rows)):
            key = tokens.metadata.encode_chunk_key((r, 0))
            if not (Path(path) / "tokens" / key).is_file():
                raise FileNotFoundError(f"the tokens of excerpts {r * rows}..{min(done, (r + 1) * rows) - 1} "
                                        f"(chunk file tokens/{key}) are missing")
        for name in ("vocab/bytes", "vocab/offsets"):
            np.asarray(_checked(root[name])[...])
    except _DAMAGE as exc:
        raise _damaged(path, exc) from None


def discard_uncommitted(path: Path) -> None:
    """Remove checkpoint generations that were written but never committed (a killed run)."""
    keep = _committed_name(_open_root(path, "r"))
    _remove_generations(path, keep=[keep] if keep else [])


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class ActivationRecord:
    """One excerpt and a neuron's activation at each of its tokens."""

    tokens: list[str]
    """The excerpt's tokens as strings."""
    activations: list[float]
    """The neuron's activation at each token."""
    excerpt_id: int = -1
    """Row of the excerpt in the store's `token_ids` (-1 if unknown)."""


@dataclass
class NeuronId:
    """A neuron: its layer and its index within the layer."""

    layer_index: int
    """Layer, from 0."""
    neuron_index: int
    """Neuron within the layer, from 0."""


@dataclass
class Split:
    """The excerpts of one split of a neuron's record."""

    top: list[ActivationRecord]
    """Top-activating excerpts dealt to this split by rank."""
    random: list[ActivationRecord]
    """Random-sample excerpts of this split, none of them among the neuron's train excerpts."""


@dataclass
class NeuronRecord:
    """Everything recorded for one neuron; names follow OpenAI's NeuronRecord."""

    neuron_id: NeuronId
    """Which neuron."""
    most_positive_activation_records: list[ActivationRecord]
    """Top-K excerpts by maximum activation, descending."""
    most_negative_activation_records: list[ActivationRecord] | None
    """Bottom-K excerpts by minimum activation, ascending (None when not recorded)."""
    random_sample: list[ActivationRecord]
    """A uniform random sample of excerpts."""
    random_sample_by_quantile: list[list[ActivationRecord]]
    """Excerpts sampled uniformly within each quantile bucket of the excerpt maximum."""
    quantile_boundaries: list[float]
    """Excerpt-maximum values that bound the buckets (len = buckets - 1)."""
    quantile_probs: list[float]
    """The quantiles those boundaries estimate."""
    mean: float
    """Mean activation over all tokens."""
    variance: float
    """Population variance over all tokens."""
    skewness: float
    """Skewness over all tokens (NaN for a constant neuron)."""
    kurtosis: float
    """Excess kurtosis over all tokens (NaN for a constant neuron)."""
    min: float
    """Smallest activation."""
    max: float
    """Largest activation."""
    frac_positive: float
    """Fraction of tokens where the activation is > 0."""
    histogram: list[int]
    """Counts of excerpt maxima: underflow, `len - 2` equal bins, overflow."""
    histogram_range: tuple[float, float]
    """(lo, hi) of the equal bins."""
    explanations: list[dict] = field(default_factory=list)
    """Explanations and scores written by `neuronatlas explain/score` (empty when none)."""

    @property
    def histogram_edges(self) -> list[float]:
        lo, hi = self.histogram_range
        return [float(v) for v in np.linspace(lo, hi, len(self.histogram) - 1)]

    def split(self, name: str) -> Split:
        """The top and random excerpts of split `name` (one of SPLITS); splits are disjoint."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}': use one of {', '.join(SPLITS)}")
        i = SPLITS.index(name)
        top = self.most_positive_activation_records[i :: len(SPLITS)]
        train_ids = {r.excerpt_id for r in self.most_positive_activation_records[:: len(SPLITS)]}
        random = [r for r in self.random_sample[i :: len(SPLITS)] if r.excerpt_id not in train_ids]
        return Split(top=top, random=random)


class TokenIds:
    """Token ids of the recorded excerpts, indexable by excerpt id: `store.token_ids[i]`."""

    def __init__(self, array, n: int, path=None):
        self._array = array
        self._n = n
        self._path = path
        self._cache: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._array.shape[1])

    def _all(self) -> np.ndarray:
        if self._cache is None:
            data = np.asarray(self._array[: self._n])
            if self._n and (data < 0).any():  # rows below excerpts_done were all written: a lost chunk
                raise _damaged(self._path, FileNotFoundError(
                    f"the tokens of excerpt {int(np.argmax((data < 0).any(axis=1)))} are missing"))
            self._cache = data
        return self._cache

    def __getitem__(self, key):
        data = self._all()
        if isinstance(key, (int, np.integer)):
            if not -self._n <= key < self._n:
                raise IndexError(f"excerpt {key} out of range (store has {self._n})")
        return data[key]

    def __array__(self, dtype=None, copy=None):
        return self._all() if dtype is None else self._all().astype(dtype)


def _moment_stats(g, count: int, sl: slice) -> dict[str, np.ndarray]:
    """mean, variance, skewness, kurtosis of neurons `sl` of layer group `g`: from the optional
    `stats` array where a layer has one (imported stores: published values, which no (count, M2,
    M3, M4) reproduces bit for bit through moment_stats), else from the moments."""
    if "stats" in g:
        s = np.asarray(g["stats"][sl], dtype=np.float64)
        return {"mean": s[:, 0], "variance": s[:, 1], "skewness": s[:, 2], "kurtosis": s[:, 3]}
    from kernels.reference import moment_stats

    return moment_stats(count, np.asarray(g["moments"][sl]))


class _OpenLayer:
    """A layer group whose arrays are opened once: reopening ~15 arrays (a metadata read each)
    cost most of a `Store.neuron` call."""

    def __init__(self, group):
        self._group = group
        self.attrs = dict(group.attrs)
        with warnings.catch_warnings():
            # A generation renamed away by a recording while this lists it: zarr warns about each
            # entry it can no longer read. Store._whole_read sees the generation gone and reads
            # the newer one; a damaged store fails on the missing array itself.
            warnings.simplefilter("ignore")
            self._names = set(group.array_keys())
        self._arrays: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __getitem__(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = _checked(self._group[name])
        return self._arrays[name]


def _checked(arr):
    return _Checked(arr) if arr.attrs.get(EVERY_CHUNK) else arr


class _Checked:
    """An array whose chunk files must all exist: reading rows whose chunk (or shard) file is
    missing raises FileNotFoundError instead of returning zeros. Local stores only (a stat per
    read); elsewhere the array is read as it is."""

    def __init__(self, arr):
        self._arr = arr
        store = arr.store_path.store
        root = getattr(store, "root", None)
        self._dir = Path(root) / arr.path if root is not None else None
        self._rows = arr.metadata.chunk_grid.chunk_shape[0] if arr.ndim else 1

    def __getattr__(self, name):
        return getattr(self._arr, name)

    def __getitem__(self, key):
        if self._dir is not None and self._arr.ndim and self._arr.size:  # an empty array has no chunks
            n = self._arr.shape[0]
            first = key[0] if isinstance(key, tuple) and key else key
            if isinstance(first, (int, np.integer)):
                lo = hi = int(first) % n if n else None
            elif isinstance(first, slice):
                start, stop, _ = first.indices(n)
                lo, hi = (start, stop - 1) if stop > start else (None, None)
            else:  # Ellipsis, or anything else: every row
                lo, hi = (0, n - 1) if n else (None, None)
            for r in range(lo // self._rows, hi // self._rows + 1) if lo is not None else ():
                k = self._arr.metadata.encode_chunk_key((r,) + (0,) * (self._arr.ndim - 1))
                if not (self._dir / k).is_file():
                    raise FileNotFoundError(f"chunk file {self._arr.path}/{k} is missing")
        return self._arr[key]


_DAMAGE = (KeyError, ValueError, TypeError, RuntimeError, OSError, IndexError, AttributeError)
"""What reading a store whose files were damaged or removed raises (zarr, numcodecs, json)."""


def _damaged(path, exc: BaseException) -> UserError:
    what = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return UserError(f"store '{path}' is damaged or incomplete ({what}); restore it from a copy or record it again")


_READ_TRIES = 20
"""Times one read starts again on a newer checkpoint before giving up (each try follows the newest
one, which a recording keeps for at least one --checkpoint-every interval)."""


def _guarded(method):
    """Turn a damaged store's low-level errors into one UserError naming the store, and make a read
    of the checkpoint whole while a recording replaces it: a call that read a generation which is
    gone afterwards (or failed because it went) starts again on the newest committed one. Only a
    store whose committed checkpoint itself is missing or broken is reported damaged. Calls made
    inside another guarded call leave all of this to the outermost one."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        local = self._local
        if getattr(local, "busy", False):
            return method(self, *args, **kwargs)
        local.busy = True
        try:
            return self._whole_read(method, args, kwargs)
        finally:
            local.busy = False
    return wrapper


def _index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{what} must be an integer, not {value!r}")
    return int(value)


def _foreign(path: Path) -> str | None:
    """Why `path`'s zarr.json is not a Zarr group's (a Zarr array, or not Zarr metadata at all), or
    None when it is one or cannot be parsed (cut short: maybe a damaged store of ours)."""
    try:
        meta = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return "its zarr.json is not Zarr metadata"
    kind = meta.get("node_type")
    if kind == "array":
        return "it is a Zarr array"
    if kind != "group" or meta.get("zarr_format") != 3:
        return "its zarr.json is not Zarr v3 group metadata"
    return None


class Store:
    """A recorded run, opened read-only. Use `open_store(path)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"'{path}' is not a neuronatlas store (no zarr.json); record one with neuronatlas record")
        why = _foreign(self.path)
        if why:
            raise UserError(f"'{path}' is not a neuronatlas store ({why})")
        try:
            self._root = _open_root(self.path, "r")
            attrs = dict(self._root.attrs)
        except _DAMAGE as exc:
            raise _damaged(path, exc) from None
        if attrs.get("format") != FORMAT:
            raise UserError(f"'{path}' is a Zarr group but not a neuronatlas store")
        version = attrs.get("format_version", 0)
        if not isinstance(version, int):
            raise _damaged(path, ValueError(f"its format version is {version!r}"))
        if version > FORMAT_VERSION:
            raise UserError(f"'{path}' has store format {version}; this neuronatlas reads up to {FORMAT_VERSION}: upgrade it")
        if not isinstance(attrs.get("run"), dict) or not isinstance(attrs.get("progress"), dict):
            raise _damaged(path, ValueError("its attributes lack the run or the progress"))
        self.attrs = attrs
        self.run: dict = attrs["run"]
        self.progress: dict = attrs["progress"]
        """The progress of the checkpoint this Store reads (newer after a recording replaced it)."""
        self._layers: dict[int, object] = {}
        self._local = threading.local()

    def __getstate__(self) -> dict:
        # Pickled as its path (to hand a store to worker processes): opened again on arrival.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _layer_number(self, layer) -> int:
        """`layer` checked, a negative one counted from the last."""
        layer, n = _index(layer, "layer"), self.n_layers
        if not -n <= layer < n:
            raise UserError(f"layer {layer} out of range: the store has layers 0..{n - 1}")
        return layer % n

    def _neuron_number(self, layer: int, index) -> int:
        """`index` in (checked) `layer`, checked, a negative one counted from the last."""
        index, n = _index(index, "neuron"), self.n_neurons[layer]
        if not -n <= index < n:
            raise UserError(f"neuron {index} out of range: layer {layer} has "
                            + (f"neurons 0..{n - 1}" if n else "no neurons (a layer missing from the records "
                               "this store was imported from)" if self.run.get("imported") else "no neurons"))
        return index % n

    # -- reading while a recording writes ----------------------------------------------------
    def _whole_read(self, method, args, kwargs):
        for _ in range(_READ_TRIES):
            seen = self.progress.get("checkpoint")
            self._local.touched = False
            try:
                result = method(self, *args, **kwargs)
            except UserError:
                raise
            except _DAMAGE as exc:
                if self._follow(seen):
                    continue
                raise _damaged(self.path, exc) from None
            # A committed generation never changes and is renamed away before it is deleted: if it
            # is still in place now, everything this call read from it was whole.
            if not self._local.touched or not seen or (self.path / seen / "zarr.json").is_file():
                return result
            if not self._follow(seen):
                raise _damaged(self.path, FileNotFoundError(f"its committed checkpoint '{seen}' is missing"))
        raise UserError(f"store '{self.path}' got {_READ_TRIES} new checkpoints while one read ran (a recording with a "
                        "very short --checkpoint-every is writing it); try again")

    def _follow(self, seen: str | None) -> bool:
        """Re-read the root attributes; if a recording has committed a checkpoint other than `seen`
        since, read that one from now on and return True."""
        try:
            root = _open_root(self.path, "r")
            attrs = dict(root.attrs)
        except _DAMAGE:
            return False
        progress = attrs.get("progress")
        if not isinstance(progress, dict) or not isinstance(attrs.get("run"), dict) \
                or progress.get("checkpoint") in (None, seen):
            return False
        self._root, self.attrs, self.run, self.progress = root, attrs, attrs["run"], progress
        self._layers = {}
        for name in ("random_ids", "token_ids"):  # cached from the checkpoint left behind
            self.__dict__.pop(name, None)
        return True

    # -- run level --------------------------------------------------------------------------
    @property
    @_guarded
    def n_layers(self) -> int:
        return int(self.run["model"]["n_layers"])

    @property
    @_guarded
    def n_neurons(self) -> list[int]:
        """Neurons per layer."""
        return [int(n) for n in self.run["model"]["n_neurons"]]

    @property
    @_guarded
    def excerpts_done(self) -> int:
        return int(self.progress["excerpts_done"])

    @property
    @_guarded
    def complete(self) -> bool:
        return bool(self.progress["complete"])

    @property
    def spec(self) -> dict:
        return self.run["spec"]

    @cached_property
    @_guarded
    def token_ids(self) -> TokenIds:
        return TokenIds(self._root["tokens"], self.excerpts_done, self.path)

    @cached_property
    @_guarded
    def vocab(self) -> list[str]:
        data = np.asarray(_checked(self._root["vocab/bytes"])[...]).tobytes()
        off = np.asarray(_checked(self._root["vocab/offsets"])[...])
        return [data[off[i] : off[i + 1]].decode("utf-8", errors="replace") for i in range(len(off) - 1)]

    @_guarded
    def tokens(self, excerpt_id: int) -> list[str]:
        """The token strings of excerpt `excerpt_id` (0 <= id < excerpts_done; negative ids count
        from the end)."""
        i, n = _index(excerpt_id, "excerpt id"), len(self.token_ids)
        if not -n <= i < n:
            raise UserError(f"excerpt {i} out of range: the store has "
                            + (f"excerpts 0..{n - 1}" if n else "no recorded excerpts yet"))
        vocab = self.vocab
        return [vocab[t] if 0 <= t < len(vocab) else "<unk>" for t in self.token_ids[i]]

    def _checkpoint(self):
        self._local.touched = True
        ck = self.progress.get("checkpoint")
        if not ck and self._follow(None):  # opened before the recording's first checkpoint
            ck = self.progress.get("checkpoint")
        if not ck:
            raise UserError(f"store '{self.path}' holds no checkpoint yet: the recording has not reached its first one")
        return self._root[ck]

    @_guarded
    def _layer(self, layer: int):
        layer = self._layer_number(layer)
        self._local.touched = True
        if layer not in self._layers:
            self._layers[layer] = _OpenLayer(self._checkpoint()[f"layers/{layer:03d}"])
        return self._layers[layer]

    @cached_property
    @_guarded
    def random_ids(self) -> np.ndarray:
        return np.asarray(_checked(self._checkpoint()["random_ids"])[...])

    # -- neuron level -----------------------------------------------------------------------
    def _records(self, ids: np.ndarray, acts: np.ndarray) -> list[ActivationRecord]:
        return [
            ActivationRecord(tokens=self.tokens(i), activations=[float(v) for v in a], excerpt_id=int(i))
            for i, a in zip(ids, acts) if i >= 0
        ]

    @_guarded
    def neuron(self, layer: int, index: int) -> NeuronRecord:
        """The record of neuron `index` of `layer` (negative numbers count from the last, as in a list)."""
        layer = self._layer_number(layer)
        index = self._neuron_number(layer, index)
        g = self._layer(layer)
        count = int(g.attrs["count"])
        stats = _moment_stats(g, count, slice(index, index + 1))
        negatives = "neg_ids" in g
        quant_ids = np.asarray(g["quant_ids"][index])
        quant_acts = np.asarray(g["quant_acts"][index])
        return NeuronRecord(
            neuron_id=NeuronId(layer, index),
            most_positive_activation_records=self._records(g["top_ids"][index], g["top_acts"][index]),
            most_negative_activation_records=(
                self._records(g["neg_ids"][index], g["neg_acts"][index]) if negatives else None),
            random_sample=self._records(
                g["random_ids"][index] if "random_ids" in g else self.random_ids, g["random_acts"][index]),
            random_sample_by_quantile=[self._records(quant_ids[q], quant_acts[q]) for q in range(len(quant_ids))],
            quantile_boundaries=[float(v) for v in g["quant_bounds"][index]],
            quantile_probs=list(self.spec["quantile_probs"]),
            mean=float(stats["mean"][0]),
            variance=float(stats["variance"][0]),
            skewness=float(stats["skewness"][0]),
            kurtosis=float(stats["kurtosis"][0]),
            min=float(g["amin"][index]),
            max=float(g["amax"][index]),
            frac_positive=float(g["n_positive"][index]) / count if count else float("nan"),
            histogram=[int(v) for v in g["hist"][index]],
            histogram_range=tuple(float(v) for v in g["hist_range"][index]),
            explanations=self.explanations(layer, index),
        )

    @_guarded
    def layer_summary(self, layer: int) -> dict[str, np.ndarray]:
        """Per-neuron scalars of a layer (max, min, mean, variance, frac_positive, ...); a negative
        layer counts from the last."""
        g = self._layer(layer)
        count = int(g.attrs["count"])
        out = _moment_stats(g, count, slice(None))
        out["max"] = np.asarray(g["amax"][...])
        out["min"] = np.asarray(g["amin"][...])
        out["frac_positive"] = np.asarray(g["n_positive"][...]) / max(count, 1)
        return out

    def explanations(self, layer: int, index: int) -> list[dict]:
        """Explanations and scores of a neuron written by `neuronatlas explain/simulate/score`: one
        dict per (explainer model, simulator model, prompt version), best score first. Keys:
        explanation, explainer_model, simulator_model, prompt_version, status, score (pooled
        top+random correlation; None = undefined or not scored yet), score_random_only, rsquared,
        absolute_dev_explained, undefined (why a score is undefined), error, simulation_mode, split,
        updated, key, candidates (every explanation sampled, with its scores). Layout: docs/EXPLAIN.md.

        As the commands do, it refuses (UserError) results made from another recording (a results
        directory copied between stores), a damaged results group or neuron file, and ids out of
        range."""
        from client.results import reader_view

        layer = self._layer_number(layer)
        index = self._neuron_number(layer, index)
        out = []
        for group in self._results_groups():
            rec = group.read(layer, index)
            if rec is None:
                continue
            d = reader_view(rec)
            d["key"] = group.key
            out.append(d)

        def rank(d):
            score = d["score"]
            number = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
            return (not number, -score if number else 0.0)

        out.sort(key=rank)
        return out

    def _results_groups(self) -> list:
        """The store's results groups, checked (another recording's, or damaged: UserError); found
        again when the `explanations` directory changes (a group added while this store is open)."""
        from client.results import DIRNAME, ResultsGroup

        base = self.path / DIRNAME
        try:
            stamp = base.stat().st_mtime_ns
        except OSError:
            return []
        cached = getattr(self, "_groups_cache", None)
        if cached is None or cached[0] != stamp:
            cached = (stamp, ResultsGroup.all(self.path))
            self._groups_cache = cached
        return cached[1]


def open_store(path: str | Path) -> Store:
    """Open a recorded run for reading."""
    return Store(path)
