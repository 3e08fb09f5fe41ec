"""Recording throughput against the forward pass, for GPT-2 shapes with random weights.

For each model shape and batch size, eager and compiled: forward-only tokens/s, recording tokens/s
with the PyTorch reference and with the Triton kernels (where Triton runs: CUDA, or the CPU
interpreter with TRITON_INTERPRET=1), their ratios to forward-only, the update's time per batch,
its achieved GB/s against a device-to-device copy measured in the same run, and peak memory.
The measurement is `engine.bench` (the same code as `neuronatlas bench`); this script loops it
over shapes and writes one JSON file.

    python benchmarks/record_throughput.py                       # CUDA: GPT-2 and GPT-2 XL, b=256,1024
    python benchmarks/record_throughput.py --models gpt2 --batch-sizes 1024 --modes compiled
    OMP_NUM_THREADS=1 python benchmarks/record_throughput.py     # CPU: tiny shape, < 1 minute

On a CPU the default is a tiny shape and few steps, so that the script keeps working without a
GPU; those numbers say nothing about GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from engine import bench  # noqa: E402


def main() -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=bench._words, default=["gpt2", "gpt2-xl"] if cuda else ["tiny"],
                   help=f"shapes ({', '.join(bench.SHAPES)}) or model names; default gpt2,gpt2-xl on CUDA, tiny on CPU")
    p.add_argument("--batch-sizes", type=bench._ints, default=[256, 1024] if cuda else [8])
    p.add_argument("--modes", type=bench._words, default=["eager", "compiled"])
    p.add_argument("--backends", type=bench._words, default=None,
                   help="default: torch, plus triton where it runs")
    p.add_argument("--excerpt-len", type=int, default=64)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--quantile-prefix", type=int, default=2048 if cuda else 16,
                   help="timing starts after the prefix (default 2048 on CUDA, 16 on CPU)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--compile-backend", default=None)
    p.add_argument("--out", default="benchmarks/out/record_throughput.json")
    args = p.parse_args()

    results = []
    for name in args.models:
        model = f"shape:{name}" if name in bench.SHAPES else name
        cfg = bench.BenchConfig(model=model, random_weights=True, batch_sizes=args.batch_sizes, modes=args.modes,
                                backends=args.backends, excerpt_len=args.excerpt_len, top_k=args.top_k,
                                quantile_prefix=args.quantile_prefix, dtype=args.dtype, device=args.device,
                                steps=args.steps, warmup=args.warmup, compile_backend=args.compile_backend)
        result = bench.run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(bench.table(result), flush=True)
        print(flush=True)
        results.append(result)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"runs": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
