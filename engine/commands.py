"""The engine's subcommands: record, info."""

from __future__ import annotations

import argparse
import json
import os



def register(sub) -> None:
    p = sub.add_parser("record", help="record every MLP neuron of a model over a corpus into a Zarr store",
                       description="Record every MLP neuron of a model over a corpus into a Zarr store. "
                       "Run the same command again to resume an interrupted recording.")
    p.add_argument("--model", default="smollm2", help="hub id, local directory, .gguf file, or 'smollm2' "
                   "(the embedded SmolLM2-135M-Instruct; default)")
    p.add_argument("--revision", default=None, help="model revision on the hub")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' (embedded: the standard library's docstrings; "
                   "default), a .txt/.jsonl/.parquet file, a directory of .txt files, or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hf rows (default: text)")
    p.add_argument("--out", required=True, help="directory of the Zarr store")
    p.add_argument("--excerpt-len", type=int, default=64, help="tokens per excerpt (default 64)")
    p.add_argument("--top-k", type=int, default=50, help="top excerpts kept per neuron (default 50)")
    p.add_argument("--random-k", type=int, default=50, help="size of the random sample (default 50)")
    p.add_argument("--quantile-k", type=int, default=10, help="excerpts sampled per quantile bucket (default 10)")
    p.add_argument("--quantile-prefix", type=int, default=2048,
                   help="excerpts whose maxima set quantile boundaries and histogram range "
                   "(default 2048; at least 1, at most a quarter of the corpus)")
    p.add_argument("--hist-bins", type=int, default=64, help="histogram bins of excerpt maxima (default 64)")
    neg = p.add_mutually_exclusive_group()
    neg.add_argument("--negatives", dest="negatives", action="store_true", default=None,
                     help="also keep the most negative excerpts (default for gated models)")
    neg.add_argument("--no-negatives", dest="negatives", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="seed of the random and quantile samples, 0 to 2^63 - 1 (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="excerpts per forward pass (default 64)")
    p.add_argument("--max-excerpts", type=int, default=None, help="record at most this many excerpts")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--bos", default="auto", choices=["auto", "yes", "no"],
                   help="prepend the BOS token to each excerpt (auto: when the tokenizer does)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                   help="seconds between checkpoints (default 300)")
    p.add_argument("--backend", default="auto",
                   help="reduction backend: auto (triton on CUDA, torch elsewhere), triton (fused kernels; "
                   "on a CPU only with TRITON_INTERPRET=1) or torch (the reference)")
    p.add_argument("--fuse-activation", action="store_true",
                   help="compute each layer's activation function in the recording kernel, so recording "
                   "adds no read of the activations (GELU and gated SiLU/GELU MLPs; needs --backend triton)")
    p.add_argument("--side-stream", action="store_true",
                   help="run each layer's update on a second CUDA stream, beside the rest of the forward "
                   "pass (triton backend, eager, CUDA; on an H200 it gained nothing, benchmarks/RESULTS.md)")
    p.add_argument("--compile", action="store_true",
                   help="run the forward pass through torch.compile (with --backend triton the reductions "
                   "join the compiled graph)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("info", help="print a store's run attributes and progress")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print the attributes as JSON")
    p.set_defaults(func=cmd_info)

    try:
        from engine import bench
    except ImportError:
        bench = None
    if bench is not None:
        bench.register(sub)
    from engine import atlas  # show, view, export, import

    atlas.register(sub)


def cmd_record(args: argparse.Namespace) -> int:
    from engine.recorder import RecordConfig, record

    fields = RecordConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    for key in ("model", "corpus", "out"):  # `--out=~/s` reaches us unexpanded (the shell expands only a word's start)
        if isinstance(values.get(key), str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])
    cfg = RecordConfig(**values)
    summary = record(cfg)
    print(summary.text(cfg.out))
    return 0 if summary.complete else 130


def cmd_info(args: argparse.Namespace) -> int:
    from engine.store import open_store

    s = open_store(args.store)
    ck = s.progress.get("checkpoint")
    if ck and not (s.path / str(ck) / "zarr.json").is_file() and not s._follow(ck):
        # The committed checkpoint is gone (and no recording has moved on from it): every read would fail.
        from engine.store import _damaged

        raise _damaged(s.path, FileNotFoundError(f"its committed checkpoint '{ck}' is missing"))
    if args.json:
        print(json.dumps(s.attrs, indent=2, default=str))
        return 0
    run, prog = s.run, s.progress
    m = run["model"]
    n_total = run["n_excerpts"]
    done = prog["excerpts_done"]
    spec = run["spec"]
    state = "complete" if prog["complete"] else ("in progress" if prog.get("checkpoint") else "started, no checkpoint yet")
    widths = sorted(set(s.n_neurons))
    per_layer = (f"{widths[0]:,} per layer" if len(widths) == 1
                 else "per layer: " + ", ".join(f"{n:,}" for n in s.n_neurons[:12]) + (", ..." if s.n_layers > 12 else ""))
    lines = [
        f"store        {s.path}  (format {s.attrs['format_version']}, created {s.attrs.get('created')})",
        f"model        {m['name']}  [{m['architecture']}, {m['model_type']}, revision {m.get('revision')}]",
        f"neurons      {sum(s.n_neurons):,} in {s.n_layers} layers ({per_layer})",
        f"dtype        {run['dtype']}   bos {run['bos']}   torch {run.get('torch')}",
        f"corpus       {json.dumps({k: v for k, v in run['corpus'].items() if k not in ('separator', 'tokens_sha256')})}",
        f"excerpts     {n_total:,} of {run['excerpt_len']} tokens",
        f"per neuron   top-K {spec['top_k']}{' (+ most negative)' if spec['negatives'] else ''}, random {spec['random_k']}, "
        f"{spec['quantile_k']} per quantile bucket {spec['quantile_probs']} (prefix {spec['quantile_prefix']}), "
        f"{spec['hist_bins']} histogram bins, seed {spec['seed']}",
        f"progress     {done:,} / {n_total:,} excerpts ({100 * done / max(n_total, 1):.1f}%), {state}, "
        f"checkpoint {prog.get('generation')} at {prog.get('updated')}",
    ]
    print("\n".join(lines))
    return 0
