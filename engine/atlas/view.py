"""`neuronatlas view STORE --out DIR [--serve]`: a static HTML atlas that opens from disk.

Layout of DIR (nothing grows with the model but the data files, one per neuron and one per layer):

    index.html, neuron.html, atlas.js, atlas.css   the two pages and their code (no data)
    data/run.js                                    the run and its layers
    data/layers/{L}.js                             per-neuron scalars of layer L for the index
    data/n/{L}/{N}.js                              one neuron's page data, loaded by neuron.html?l=L&n=N

Data files are JavaScript (`NA.neuron({...})`) so that a page opened from file:// can load them
with a <script> tag; browsers refuse fetch() there. JSON is written with <, >, & and the line
separators escaped, and the pages put every string in with textContent (see assets.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from engine.atlas import assets, data
from engine.errors import UserError

MARKER = ".neuronatlas-atlas"
STATIC = {"index.html": assets.INDEX_HTML, "neuron.html": assets.NEURON_HTML,
          "atlas.js": assets.JS, "atlas.css": assets.CSS}


def _r(v) -> float | None:
    """4 significant digits (what a page shows), None for NaN and infinities."""
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.4g}")


def js_call(fn: str, *args) -> str:
    """`fn(args...);` with each argument as JSON that is safe inside any HTML or JS context."""
    parts = []
    for a in args:
        text = json.dumps(a, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        parts.append(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return f"{fn}({','.join(parts)});\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _bucket_title(q: int, probs: list) -> str:
    lo = 0.0 if q == 0 else (probs[q - 1] if q - 1 < len(probs) else None)
    hi = 1.0 if q == len(probs) else (probs[q] if q < len(probs) else None)
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return f"Sampled between excerpt-maximum quantiles {lo:g} and {hi:g}"
    return f"Sampled from excerpt-maximum bucket {q}"


def neuron_payload(store, layer: int, index: int, limits: dict) -> tuple[dict, list]:
    """What neuron.html shows for one neuron, and its explanations (best first)."""
    rec = store.neuron(layer, index)
    expls = data.explanations(store, layer, index)
    best = data.best(expls)
    expls = ([best] + [e for e in expls if e is not best]) if best else []
    strings: dict[str, int] = {}

    def pack(records, limit):
        out = []
        for r in records[:limit]:
            out.append({"e": r.excerpt_id, "t": [strings.setdefault(t, len(strings)) for t in r.tokens],
                        "a": [_r(a) for a in r.activations]})
        return out

    sections = [{"kind": "top", "title": "Top activating excerpts", "total": len(rec.most_positive_activation_records),
                 "records": pack(rec.most_positive_activation_records, limits["top"])},
                {"kind": "random", "title": "Random sample", "total": len(rec.random_sample),
                 "records": pack(rec.random_sample, limits["random"])}]
    probs = list(rec.quantile_probs)
    for q, bucket in enumerate(rec.random_sample_by_quantile):
        sections.append({"kind": f"quantile-{q}", "title": _bucket_title(q, probs), "total": len(bucket),
                         "records": pack(bucket, limits["per_quantile"])})
    neg = rec.most_negative_activation_records or []
    sections.append({"kind": "negative", "title": "Most negative excerpts", "total": len(neg),
                     "records": pack(neg, limits["negative"])})

    def finite(values):
        return [a for a in values if a is not None and math.isfinite(a)]

    shown = finite(a for s in sections for r in s["records"] for a in r["a"])
    pos = rec.max if math.isfinite(rec.max) and rec.max > 0 else max([a for a in shown if a > 0], default=0.0)
    negs = rec.min if math.isfinite(rec.min) and rec.min < 0 else min([a for a in shown if a < 0], default=0.0)
    notes = list(store.run.get("imported", {}).get("atlas_notes", []))
    payload = {
        "layer": layer, "index": index, "absent": data.is_absent(rec),
        "stats": {"max": _r(rec.max), "min": _r(rec.min), "mean": _r(rec.mean), "variance": _r(rec.variance),
                  "skewness": _r(rec.skewness), "kurtosis": _r(rec.kurtosis), "density": _r(rec.frac_positive)},
        "quantiles": [{"p": _r(probs[i]) if i < len(probs) and isinstance(probs[i], (int, float)) else None, "v": _r(b)}
                      for i, b in enumerate(rec.quantile_boundaries)],
        "hist": {"counts": [int(c) for c in rec.histogram], "lo": _r(rec.histogram_range[0]),
                 "hi": _r(rec.histogram_range[1]),
                 "note": store.run.get("imported", {}).get("histogram_note")},
        "explanations": [{"text": e.text, "score": _r(e.score), "source": e.source, "undefined": e.undefined}
                         for e in expls],
        "strings": list(strings),
        "sections": sections,
        # One scale for both signs (as in `show`): GELU's small dip stays faint.
        "scale": {"pos": _r(max(pos, -negs)) or 0.0, "neg": _r(max(pos, -negs)) if negs < 0 else 0.0},
        "notes": notes,
    }
    return payload, expls


def _write_neuron(store, layer: int, index: int, arg) -> tuple:
    """Worker: write data/n/{layer}/{index}.js; return what the layer index needs."""
    out, limits = arg
    payload, expls = neuron_payload(store, layer, index, limits)
    if not payload["absent"]:  # a gap in an imported recording gets no page
        _write(Path(out) / "data" / "n" / str(layer) / f"{index}.js", js_call("NA.neuron", payload))
    best = expls[0] if expls else None
    return (payload["absent"], best.score if best else None, best.text if best else None, len(expls))


def _median(values) -> float | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(np.median(v)) if len(v) else None


def build(store, out: Path, layers: list[int] | None = None, limits: dict | None = None,
          jobs: int | None = None, progress: bool = True) -> str:
    """Write the atlas of `store` into `out`; returns a one-paragraph summary."""
    t0 = time.perf_counter()
    out = Path(out)
    limits = {"top": 20, "random": 20, "per_quantile": 5, "negative": 10, **(limits or {})}
    layers = list(range(store.n_layers)) if layers is None else layers
    if not store.progress.get("checkpoint"):
        raise UserError(f"store '{store.path}' holds no checkpoint yet: the recording has not reached its first one")
    data.refuse_foreign_results(store)  # before the old atlas is replaced
    items = [(layer, i) for layer in layers for i in range(store.n_neurons[layer])]
    final = out
    # Built beside --out and swapped in whole: a run that fails halfway (a damaged chunk) leaves the
    # previous atlas as it was.
    with data.staged_output(final, MARKER, "atlas", {"data", *STATIC}) as out:
        (out / MARKER).write_text("written by neuronatlas view; the directory is replaced when it runs again\n")
        jobs = data.default_jobs(len(items)) if jobs is None else max(1, jobs)
        update, close = data.progress_bar(len(items), "view", progress)
        try:
            results = data.map_neurons(store, items, _write_neuron, (str(out), limits), jobs, update)
        finally:
            close()
        by_layer: dict[int, list] = {layer: [] for layer in layers}
        for (layer, _), res in zip(items, results):
            by_layer[layer].append(res)

        layer_rows, explained_total, pages = [], 0, 0
        for layer in range(store.n_layers):
            n = store.n_neurons[layer]
            if layer not in by_layer:
                layer_rows.append({"layer": layer, "n": n, "included": False, "explained": 0, "best_score": None,
                                   "median_max": None, "median_density": None})
                continue
            res = by_layer[layer]
            summ = store.layer_summary(layer) if n else {k: np.zeros(0) for k in ("max", "mean", "frac_positive")}
            absent = [bool(r[0]) for r in res]
            scores = [_r(r[1]) for r in res]
            payload = {
                "n": n,
                "absent": [1 if a else 0 for a in absent],
                "max": [_r(v) for v in summ["max"]],
                "mean": [_r(v) for v in summ["mean"]],
                "density": [_r(v) for v in summ["frac_positive"]],
                "score": scores,
                "expl": [r[2] for r in res],
            }
            _write(out / "data" / "layers" / f"{layer}.js", js_call("NA.layer", layer, payload))
            present = [i for i in range(n) if not absent[i]]
            explained = sum(1 for r in res if r[3])
            explained_total += explained
            pages += len(present)
            layer_rows.append({
                "layer": layer, "n": n, "included": True, "explained": explained,
                "best_score": max([s for s in scores if s is not None], default=None),
                "median_max": _median(payload["max"][i] for i in present),
                "median_density": _median(payload["density"][i] for i in present),
            })

        run = store.run
        model = run["model"]
        corpus = run.get("corpus") or {}
        facts = [["model", f"{model.get('name')} ({model.get('architecture')}, revision {model.get('revision')})"],
                 ["corpus", ", ".join(f"{k}: {v}" for k, v in corpus.items()
                                      if k not in ("separator", "tokens_sha256") and not isinstance(v, (dict, list)))],
                 ["excerpts", f"{store.excerpts_done:,} of {run.get('excerpt_len')} tokens"
                              + ("" if store.complete else " (recording incomplete: its last checkpoint)")],
                 ["neurons", f"{sum(store.n_neurons):,} in {store.n_layers} layers"],
                 ["store", str(store.path.resolve())],
                 ["atlas written", time.strftime("%Y-%m-%d %H:%M:%S")]]
        if run.get("imported"):
            facts.insert(0, ["imported from", str(run["imported"].get("source"))])
        _write(out / "data" / "run.js", js_call("NA.run", {
            "model": str(model.get("name")), "excerpts": store.excerpts_done, "excerpt_len": run.get("excerpt_len"),
            "facts": facts, "layers": layer_rows, "explained": explained_total, "limits": limits,
        }))
        for name, text in STATIC.items():
            _write(out / name, text)
    secs = time.perf_counter() - t0
    return (f"Wrote an atlas of {pages:,} neurons in {len(layers)} layers ({explained_total:,} explained) to "
            f"{final} in {secs:.1f} s; open {final / 'index.html'} in a browser (no server or network needed).")


def serve(out: Path, port: int, ready=None):
    """Serve `out` on 127.0.0.1:`port` until interrupted; `ready(server)` is called once listening."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(out))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise UserError(f"cannot serve on 127.0.0.1:{port}: {exc.strerror or exc}; try another --port") from None
    if ready:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return server


def cmd_view(args) -> int:
    from engine.store import open_store

    store = open_store(args.store)
    layers = data.parse_layers(args.layers, store.n_layers)
    limits = {"top": args.top, "random": args.random, "per_quantile": args.per_quantile, "negative": args.negative}
    with data.one_snapshot(store, "view"):
        print(build(store, Path(args.out), layers, limits, args.jobs, args.progress))
    if args.serve:
        def ready(server):
            host, port = server.server_address[:2]
            print(f"serving {args.out} on http://{host}:{port}/index.html (Ctrl-C to stop)", flush=True)

        try:
            serve(Path(args.out), args.port, ready)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    return 0
