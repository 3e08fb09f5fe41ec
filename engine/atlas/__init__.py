"""Seeing and sharing neurons: `show` (terminal), `view` (static HTML atlas), and `export` /
`import` in the layout of OpenAI's published neuron data. See docs/ATLAS.md."""

from __future__ import annotations


def _nonneg(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be 0 or more")
    return v


def register(sub) -> None:
    """Add show, view, export and import to the `neuronatlas` command."""
    from engine.atlas.show import MODES

    p = sub.add_parser("show", help="print one neuron's statistics and excerpts, shaded by activation",
                       description="Print a neuron's statistics, explanation and excerpts with each token "
                       "shaded by its activation (truecolor when COLORTERM=truecolor, 256 colours on other "
                       "terminals, [token:value] brackets without colour or with NO_COLOR).")
    p.add_argument("store", help="store directory")
    p.add_argument("layer", type=int, help="layer index, from 0")
    p.add_argument("neuron", type=int, help="neuron index within the layer, from 0")
    p.add_argument("--top", type=_nonneg, default=10, help="top-activating excerpts to show (default 10)")
    p.add_argument("--random", type=_nonneg, default=5, help="random-sample excerpts to show (default 5)")
    p.add_argument("--per-quantile", type=_nonneg, default=2, help="excerpts per quantile bucket (default 2)")
    p.add_argument("--negative", type=_nonneg, default=5, help="most negative excerpts, when recorded (default 5)")
    p.add_argument("--color", default="auto", choices=MODES, help="colour mode (default auto)")
    p.add_argument("--width", type=int, default=None, help="wrap at this many columns (default: the terminal's)")
    p.set_defaults(func=_lazy("engine.atlas.show", "cmd_show"))

    p = sub.add_parser("view", help="write a static HTML atlas of a store (opens from disk, no network)",
                       description="Write a static HTML atlas: an index of layers and neurons (sortable by "
                       "score, maximum activation and density, filterable by explanation text) and a page per "
                       "neuron with token heatmaps, the histogram of excerpt maxima, statistics and "
                       "explanations. Open OUT/index.html in a browser; no server or network needed.")
    p.add_argument("store", help="store directory")
    p.add_argument("--out", required=True, help="directory to write the atlas into")
    p.add_argument("--layers", default=None, help="layers to include, e.g. 0,3,5-7 (default all)")
    p.add_argument("--top", type=_nonneg, default=20, help="top excerpts per neuron page (default 20)")
    p.add_argument("--random", type=_nonneg, default=20, help="random-sample excerpts per page (default 20)")
    p.add_argument("--per-quantile", type=_nonneg, default=5, help="excerpts per quantile bucket (default 5)")
    p.add_argument("--negative", type=_nonneg, default=10, help="most negative excerpts per page (default 10)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: 1 for small stores, "
                   "up to 8 for large ones)")
    p.add_argument("--serve", action="store_true", help="then serve the atlas on http://127.0.0.1:PORT")
    p.add_argument("--port", type=int, default=8000, help="port for --serve (default 8000; 0 = any free)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_lazy("engine.atlas.view", "cmd_view"))

    p = sub.add_parser("export", help="write a store in the layout of OpenAI's published neuron data",
                       description="Write DIR/collated-activations/{layer}/{neuron}.json (OpenAI's NeuronRecord "
                       "JSON) and, where explanations exist, DIR/explanations/{layer}/{neuron}.jsonl.")
    p.add_argument("store", help="store directory")
    p.add_argument("--format", default="openai", choices=["openai"], help="output format (default openai)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", default=None, help="layers to export, e.g. 0,3,5-7 (default all)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: by store size)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_lazy("engine.atlas.export", "cmd_export"))

    p = sub.add_parser("import", help="read OpenAI-format neuron data into a new store",
                       description="Read DIR/collated-activations/{layer}/{neuron}.json (and "
                       "DIR/explanations/{layer}/{neuron}.jsonl) into a new store that the explain and "
                       "score commands can use. See docs/ATLAS.md for what a published record lacks.")
    p.add_argument("dir", help="directory holding collated-activations/ (or the layer directories themselves)")
    p.add_argument("--out", required=True, help="directory of the new store (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64"],
                   help="activation dtype (default auto: float32 when every value is exactly a float32)")
    p.add_argument("--quantile-probs", default=None,
                   help="the quantiles the published boundaries estimate, e.g. 0.5,0.9,0.99,0.999 "
                   "(default: unknown)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_lazy("engine.atlas.export", "cmd_import"))


def _lazy(module: str, name: str):
    """A command function imported when it runs, so that `neuronatlas --help` stays fast."""

    def run(args):
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run
