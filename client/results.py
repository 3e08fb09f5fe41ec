"""Explanations, simulations and scores inside the store, beside the recording (docs/EXPLAIN.md).

    STORE/explanations/zarr.json                       a Zarr group (attributes: format)
    STORE/explanations/requests.sqlite                 the durable request store (default place)
    STORE/explanations/<key>/zarr.json                 a group per (explainer, simulator, prompt version)
    STORE/explanations/<key>/neurons/LLL/NNNNNN.json   one neuron's result (layer LLL, neuron NNNNNN)

One JSON file per neuron, written whole to a temporary name, flushed (fsync'ed unless --no-fsync)
and renamed over the old one: a reader or a killed run sees the old file or the new one, never half
of one. A neuron file holds its status (how far the neuron has got), its explanations, their
simulations and scores, and on top the fields the store's reader returns (`Store.explanations`).
A rerun reads the status and skips what is finished.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.errors import UserError

DIRNAME = "explanations"
GROUP_FORMAT = "neuronatlas-explanations"
GROUP_FORMAT_VERSION = 1
REQUESTS_FILE = "requests.sqlite"

SCORE_FIELDS = ("score", "score_random_only", "rsquared", "absolute_dev_explained", "undefined", "calibration")
"""Fields of a neuron file that are null until `score` fills them."""

STATUSES = ("explained", "simulated", "scored", "never_fires", "failed")
"""How far a neuron has got: explained -> simulated -> scored; never_fires and failed are final."""

READER_KEYS = ("explanation", "explainer_model", "simulator_model", "prompt_version", "status", "score",
               "score_random_only", "rsquared", "absolute_dev_explained", "undefined", "error", "simulation_mode",
               "split", "updated")
"""Top-level fields of a neuron file that engine.store.Store.explanations returns."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def group_key(explainer: str, simulator: str, prompt_version: str) -> str:
    """A directory name for (explainer, simulator, prompt version): readable, and unique (a short hash
    of the exact names is added when the readable part had to drop characters)."""
    readable = f"{_slug(explainer)}__{_slug(simulator)}__{_slug(prompt_version)}"
    if _slug(explainer) != explainer or _slug(simulator) != simulator or _slug(prompt_version) != prompt_version:
        digest = hashlib.sha256(json.dumps([explainer, simulator, prompt_version]).encode()).hexdigest()[:8]
        readable += f"__{digest}"
    return readable


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone surrogate ("\\ud800" in JSON: half an emoji): no character, and not encodable as UTF-8.
Corpora, explanations and results files replace it with U+FFFD."""


def json_safe(value):
    """JSON-safe: NaN and infinities become None (undefined), never a number; a lone surrogate (a
    reply's "\\ud800": half a character, not encodable as UTF-8) becomes U+FFFD."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, obj, durable: bool = True) -> None:
    """Write `obj` to `path` so that no reader and no crash ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # two writers never share one
    data = json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        try:
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable."""
    try:
        return load_json(path)
    except UserError:
        return None


def load_json(path: Path, fix: str = "restore it from a copy, or delete it") -> dict | None:
    """A JSON object from `path`; None when there is no such file; UserError naming the file when
    it is there but damaged (cut short, not JSON, nested too deeply to parse, not an object). The
    results files are written whole (write_json_atomic), so a damaged one was damaged from outside:
    it is reported, never taken for a neuron with no result and silently made again."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}): {fix}") from None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else (
            "empty" if not raw.strip() else f"not JSON: {getattr(exc, 'msg', exc)}")
        raise UserError(f"{path} is damaged ({why}): {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object): {fix}")
    return obj


def recording_fingerprint(store_path: str | Path) -> str | None:
    """A short hash of the recording's identity (model and weights, corpus and its tokens, settings),
    kept in each results group: results copied into a store of another recording are refused
    instead of scored against activations they were never made from. None if unreadable."""
    meta = read_json(Path(store_path) / "zarr.json")
    run = ((meta or {}).get("attributes") or {}).get("run")
    if not isinstance(run, dict) or "identity" not in run:
        return None
    text = json.dumps(run["identity"], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _ensure_zarr_group(path: Path, attributes: dict, durable: bool) -> None:
    meta = path / "zarr.json"
    current = read_json(meta)
    if current is not None and current.get("node_type") == "group":
        return
    write_json_atomic(meta, {"zarr_format": 3, "node_type": "group", "attributes": attributes}, durable)


DAMAGED_FIX = "restore it from a copy, or delete it to make that neuron's results again"


class ResultsGroup:
    """The results of one (explainer, simulator, prompt version) inside a store."""

    def __init__(self, store_path: str | Path, key: str, attrs: dict):
        self.store_path = Path(store_path)
        self.key = key
        self.attrs = attrs
        self.path = self.store_path / DIRNAME / key

    # -- finding and creating ---------------------------------------------------------------------
    @classmethod
    def all(cls, store_path: str | Path) -> list["ResultsGroup"]:
        """Every results group of a store, by key."""
        base = Path(store_path) / DIRNAME
        out = []
        if base.is_dir():
            for d in sorted(base.iterdir()):
                # A damaged group is reported: taken for no group, its results would be shown without
                # the check below, and a new run would write it afresh over another recording's.
                meta = load_json(d / "zarr.json", "restore it, or delete the directory") if d.is_dir() else None
                attrs = (meta or {}).get("attributes") or {}
                if attrs.get("format") == GROUP_FORMAT:
                    group = cls(store_path, d.name, attrs)
                    group.check_recording()
                    out.append(group)
        return out

    def check_recording(self) -> None:
        """Refuse results made from another recording (a results directory copied between stores)."""
        made_from = self.attrs.get("recording")
        if made_from is None:  # written before groups carried it
            return
        now_ = recording_fingerprint(self.store_path)
        if now_ is not None and now_ != made_from:
            raise UserError(f"{self.path} holds results made from another recording (fingerprint {made_from}, "
                            f"this store's is {now_}): they cannot be scored or shown with this store's activations; "
                            "move them back to their store or delete them")

    @classmethod
    def for_models(cls, store_path: str | Path, explainer: str, simulator: str, prompt_version: str) -> "ResultsGroup":
        key = group_key(explainer, simulator, prompt_version)
        meta = load_json(Path(store_path) / DIRNAME / key / "zarr.json", "restore it, or delete the directory")
        attrs = (meta or {}).get("attributes") or {
            "format": GROUP_FORMAT, "format_version": GROUP_FORMAT_VERSION, "explainer_model": explainer,
            "simulator_model": simulator, "prompt_version": prompt_version}
        return cls(store_path, key, attrs)

    @property
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    @property
    def explainer_model(self) -> str:
        return self.attrs["explainer_model"]

    @property
    def simulator_model(self) -> str:
        return self.attrs["simulator_model"]

    @property
    def prompt_version(self) -> str:
        return self.attrs["prompt_version"]

    def create(self, durable: bool = True) -> None:
        """Make the group (and the `explanations` group above it) if they are missing."""
        if self.attrs.get("format_version", GROUP_FORMAT_VERSION) > GROUP_FORMAT_VERSION:
            raise UserError(f"{self.path} was written by a newer neuronatlas (results format "
                            f"{self.attrs['format_version']}): upgrade it")
        try:
            _ensure_zarr_group(self.store_path / DIRNAME, {"format": "neuronatlas-explanations-root",
                                                           "description": "results of explain, simulate and score"},
                               durable)
            if not self.exists:
                self.attrs.setdefault("created", now())
                self.attrs.setdefault("recording", recording_fingerprint(self.store_path))
            else:
                self.check_recording()
            _ensure_zarr_group(self.path, self.attrs, durable)
        except OSError as exc:
            raise UserError(f"cannot write results into {self.store_path}: {exc.strerror}") from None

    # -- neurons ----------------------------------------------------------------------------------
    def neuron_path(self, layer: int, index: int) -> Path:
        return self.path / "neurons" / f"{layer:03d}" / f"{index:06d}.json"

    def read(self, layer: int, index: int) -> dict | None:
        """A neuron's result, or None when it has none; UserError when its file is damaged."""
        rec = load_json(self.neuron_path(layer, index), DAMAGED_FIX)
        return rec if rec is not None and rec.get("status") in STATUSES else None

    def write(self, layer: int, index: int, rec: dict, durable: bool = True) -> None:
        rec = dict(rec)
        for name in SCORE_FIELDS:  # null until scored (docs/EXPLAIN.md, "A neuron file"), never absent
            rec.setdefault(name, None)
        rec.update({"format": GROUP_FORMAT_VERSION, "layer": layer, "neuron": index, "key": self.key,
                    "explainer_model": self.explainer_model, "simulator_model": self.simulator_model,
                    "prompt_version": self.prompt_version, "updated": now()})
        write_json_atomic(self.neuron_path(layer, index), rec, durable)

    def records(self, layers: set[int] | None = None) -> Iterator[dict]:
        """Every neuron result of the group (in layer, neuron order)."""
        base = self.path / "neurons"
        if not base.is_dir():
            return
        for ldir in sorted(base.iterdir()):
            if not (ldir.is_dir() and ldir.name.isdigit()) or (layers is not None and int(ldir.name) not in layers):
                continue
            for f in sorted(ldir.iterdir()):
                if f.suffix == ".json" and not f.name.startswith(".") and f.stem.isdigit():
                    rec = load_json(f, DAMAGED_FIX)
                    if rec is not None and rec.get("status") in STATUSES:
                        # Where the file lies says which neuron it is (not a field one could edit).
                        rec["layer"], rec["neuron"] = int(ldir.name), int(f.stem)
                        yield rec

    @contextmanager
    def lock(self):
        """Hold the group for one run: a second run on the same group is refused, not interleaved."""
        from engine.store import exclusive

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write results into {self.store_path}: {exc.strerror or exc}") from None
        with exclusive(self.path / ".lock", f"another neuronatlas run is writing to {self.path}: wait for it to "
                       "finish or stop it", os.O_RDWR | os.O_CREAT):
            yield self


def reader_view(rec: dict) -> dict:
    """What Store.explanations returns for one neuron file."""
    out = {k: rec.get(k) for k in READER_KEYS}
    out["key"] = rec.get("key")
    out["candidates"] = [{"explanation": c.get("explanation"), **{k: (c.get("scores") or {}).get(k) for k in (
        "score", "score_random_only", "rsquared", "absolute_dev_explained")}, "error": c.get("error")}
        for c in rec.get("candidates") or [] if isinstance(c, dict)]
    return out
