"""Launch shapes of the Triton update on a GPU: time per layer and GB/s against a copy, per shape.

For GPT-2 (N = 3072, batch 1024) and GPT-2 XL (N = 6400, batch 256) widths, 64-token excerpts, bf16:
the steady-state update of one layer (after the quantile prefix; nothing enters a top-K) under
each `kernels.triton_update.TUNING` in the sweep, next to

* a device-to-device copy of the same bytes (bytes read + written per second);
* `amax` over the tokens in PyTorch: the simplest separate pass that reads the activations once;
* the activation step alone in PyTorch (tanh-GELU of the pre-activations: read + write), the same
  step followed by the Triton update (two passes), and the fused step (`activate_update`: one pass
  that writes the activations and reduces them). Fused minus GELU alone is what recording adds
  where the activation is produced.

Each number is the median of per-step CUDA-event times over `--reps` steps; a step is one planned
batch folded into `--layers` states (as the recorder does per batch), divided by the layers.

    python benchmarks/kernel_sweep.py --out benchmarks/out/kernel_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine import bench  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels import triton_update as tu  # noqa: E402

SHAPES = {"gpt2": (3072, 1024), "gpt2-xl": (6400, 256), "tiny": (80, 6)}
"""(neurons, batch) per shape; tiny is for a CPU run through the interpreter (TRITON_INTERPRET=1),
which checks that the script runs and says nothing about speed."""


def _median_ms(fn, reps: int) -> float:
    if not torch.cuda.is_available():
        import time

        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    times = []
    for i in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(i)
        e1.record()
        times.append((e0, e1))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def time_update(n: int, B: int, T: int, layers: int, reps: int, dtype, device, fused: bool) -> float:
    """Median ms of one layer's steady-state update (fused: the activation step and the update)."""
    spec = ref.ReductionSpec(excerpt_len=T, top_k=50, negatives=False, quantile_prefix=B)
    states = [ref.LayerState.empty(spec, n, dtype, device) for _ in range(layers)]
    sample = ref.RandomSample.empty(spec, device)
    gen = torch.Generator(device=device).manual_seed(n)
    xs = [torch.randn((B, T, n), generator=gen, device=device).to(dtype) for _ in range(2)]
    first = 0

    def plan():
        nonlocal sample, first
        batch, sample = ref.plan_batch(spec, sample, first, B, device)
        first += B
        return batch

    def run(i, batch):
        for s in states:
            if fused:
                tu.activate_update(s, spec, xs[i % 2], None, "gelu_tanh", batch)
            else:
                tu.update_layer(s, spec, xs[i % 2], batch)

    for i in range(4):  # the prefix batch, then warm-up
        run(i, plan())
    batches = [plan() for _ in range(reps)]  # planned ahead: host work stays out of the timing
    ms = _median_ms(lambda i: run(i, batches[i]), reps)
    return ms / layers


def time_torch(n: int, B: int, T: int, layers: int, reps: int, dtype, device, what: str) -> float:
    gen = torch.Generator(device=device).manual_seed(n + 1)
    xs = [torch.randn((B, T, n), generator=gen, device=device).to(dtype) for _ in range(2)]
    if what == "amax":
        fn = lambda i: [xs[i % 2].amax(dim=1) for _ in range(layers)]  # noqa: E731
    else:
        fn = lambda i: [F.gelu(xs[i % 2], approximate="tanh") for _ in range(layers)]  # noqa: E731
    for i in range(3):
        fn(i)
    return _median_ms(fn, reps) / layers


def _configs(text: str) -> list[tuple[int, int, int, int]]:
    try:
        out = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        out = []
    if not out or any(len(c) not in (3, 4) or min(c) < 1 for c in out):
        raise argparse.ArgumentTypeError(f"expected block_n:programs_per_sm:num_warps[:chunk],..., got '{text}'")
    return [c + (tu.TUNING["chunk"],) if len(c) == 3 else c for c in out]


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=bench._words, default=["gpt2", "gpt2-xl"])
    p.add_argument("--configs", type=_configs,
                   default=_configs("256:4:4:8,128:4:4:8,512:4:4:8,256:8:4:8,256:4:4:16,128:8:4:16,512:4:8:8"),
                   help="block_n:programs_per_sm:num_warps[:chunk] of the stream kernel, comma-separated (each "
                   "new one costs a few compilations, about 1.5 s each)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--excerpt-len", type=int, default=64)
    p.add_argument("--out", default="benchmarks/out/kernel_sweep.json")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel_sweep.py times the kernels on a CUDA GPU (or, to check the script, "
              "TRITON_INTERPRET=1 with --shapes tiny)", file=sys.stderr)
        return 1
    device, dtype, T = torch.device("cuda" if cuda else "cpu"), torch.bfloat16, args.excerpt_len
    el = 2
    result = {"env": bench.environment(device, dtype), "rows": []}
    default = dict(tu.TUNING)
    print(f"{result['env']['device']} | torch {result['env']['torch']} | triton {result['env']['triton']}", flush=True)
    for shape in args.shapes:
        n, B = SHAPES[shape]
        nbytes = B * T * n * el
        cfg = bench.BenchConfig(model="-", steps=20)
        copy = bench.measure_copy(nbytes, dtype, device, cfg)
        base = {"shape": shape, "N": n, "batch": B, "bytes": nbytes, "copy_GBps": copy,
                "copy_ms": 1e3 * 2 * nbytes / (copy * 1e9), "read_once_ms": 1e3 * nbytes / (copy * 1e9)}
        base["amax_ms"] = time_torch(n, B, T, args.layers, args.reps, dtype, device, "amax")
        base["gelu_ms"] = time_torch(n, B, T, args.layers, args.reps, dtype, device, "gelu")
        print(f"{shape}: N={n} B={B} {nbytes / 2**20:.0f} MiB/layer, copy {copy:,.0f} GB/s, read once "
              f"{base['read_once_ms']:.3f} ms, torch amax {base['amax_ms']:.3f} ms, torch gelu {base['gelu_ms']:.3f} ms",
              flush=True)
        for bn, pps, nw, chunk in args.configs:
            tu.TUNING.update(block_n=bn, programs_per_sm=pps, num_warps=nw, chunk=chunk)
            row = dict(base, block_n=bn, programs_per_sm=pps, num_warps=nw, chunk=chunk)
            try:
                row["update_ms"] = time_update(n, B, T, args.layers, args.reps, dtype, device, fused=False)
                row["fused_ms"] = time_update(n, B, T, args.layers, args.reps, dtype, device, fused=True)
            except Exception as exc:  # a shape the compiler refuses (registers, shared memory)
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"  block_n={bn} programs/SM={pps} warps={nw} chunk={chunk}: {row['error']}", flush=True)
                result["rows"].append(row)
                _write(result, args.out)
                continue
            row["update_GBps"] = nbytes / (row["update_ms"] / 1e3) / 1e9
            row["update_of_copy"] = row["update_GBps"] / copy
            print(f"  block_n={bn:3d} programs/SM={pps} warps={nw} chunk={chunk:2d}: update {row['update_ms']:.3f} ms "
                  f"({row['update_GBps']:,.0f} GB/s, {row['update_of_copy']:.2f} of copy); fused gelu+update "
                  f"{row['fused_ms']:.3f} ms vs torch gelu {base['gelu_ms']:.3f} (+{row['fused_ms'] - base['gelu_ms']:.3f})"
                  f" vs gelu then update {base['gelu_ms'] + row['update_ms']:.3f}", flush=True)
            result["rows"].append(row)
            _write(result, args.out)  # after each row: a run cut short keeps what it measured
        tu.TUNING.update(default)
        if cuda:
            torch.cuda.empty_cache()
    _write(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
