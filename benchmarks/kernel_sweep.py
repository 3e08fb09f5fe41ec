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

After the launch shapes: `--variants` (other `TUNING` settings on the default shape, such as
finish_warps=2), then `--ablate`: the plain update with stages of the stream kernel left out
(`triton_update._ABLATE`; the state comes out wrong, the time difference is what the stage costs:
1 float64 power sums (float32 instead), 16 per-token power sums (stream kernel); 2 histogram,
4 quantile buckets, 8 top-K candidates (excerpt kernel); 31 all of them, leaving loads, maximum,
minimum and positives). `--fresh` draws new activations for every batch, so that excerpts keep
entering the top-K lists as in a recording; `--split` adds the stream, excerpt and finish
kernels' own times (torch.profiler).

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


def _kernel_ms(prof, steps: int) -> dict:
    """Device milliseconds per step of the stream, excerpt and finish kernels, from a torch.profiler run."""
    out = {"stream_ms": 0.0, "excerpt_ms": 0.0, "finish_ms": 0.0}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None)
        if total is None:
            total = getattr(evt, "cuda_time_total", 0.0)
        for name in ("stream", "excerpt", "finish"):
            if f"_{name}_kernel" in evt.key:
                out[f"{name}_ms"] += total / 1e3 / steps  # the profiler counts microseconds
    return out


def time_update(n: int, B: int, T: int, layers: int, reps: int, dtype, device, fused: bool,
                fresh: bool = False, split: bool = False) -> dict:
    """Median ms of one layer's steady-state update (fused: the activation step and the update).

    fresh: every batch new random activations, so that excerpts keep entering the top-K lists as
    in a recording (after about 4 to 24 batches of B excerpts: K x B / seen candidates per neuron
    and batch); otherwise two tensors alternate and, after the first two batches, nothing beats a
    K-th value (the quantile samples, which sample by excerpt id, still take candidates).
    split: the timed steps also run under torch.profiler, which adds the stream, excerpt and
    finish kernels' own device times (per layer)."""
    spec = ref.ReductionSpec(excerpt_len=T, top_k=50, negatives=False, quantile_prefix=B)
    states = [ref.LayerState.empty(spec, n, dtype, device) for _ in range(layers)]
    sample = ref.RandomSample.empty(spec, device)
    gen = torch.Generator(device=device).manual_seed(n)
    xs = [torch.randn((B, T, n), generator=gen, device=device).to(dtype) for _ in range(reps + 4 if fresh else 2)]
    first = 0

    def plan():
        nonlocal sample, first
        batch, sample = ref.plan_batch(spec, sample, first, B, device)
        first += B
        return batch

    def run(i, batch):
        x = xs[i % len(xs)]
        for s in states:
            if fused:
                tu.activate_update(s, spec, x, None, "gelu_tanh", batch)
            else:
                tu.update_layer(s, spec, x, batch)

    for i in range(4):  # the prefix batch, then warm-up
        run(i, plan())
    batches = [plan() for _ in range(reps)]  # planned ahead: host work stays out of the timing
    out = {}
    if split and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ms = _median_ms(lambda i: run(i + 4, batches[i]), reps)
        out = {k: v / layers for k, v in _kernel_ms(prof, reps).items()}
    else:
        ms = _median_ms(lambda i: run(i + 4, batches[i]), reps)
    return dict(out, ms=ms / layers)


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


def _variants(text: str) -> list[dict]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            v = {k: int(x) for k, _, x in (kv.partition("=") for kv in item.split(";"))}
        except ValueError:
            v = {}
        if not v or any(k not in tu.TUNING for k in v):
            raise argparse.ArgumentTypeError(f"expected key=value[;key=value],... with keys of TUNING "
                                             f"({', '.join(tu.TUNING)}), got '{item}'")
        out.append(v)
    return out


def _masks(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = [-1]
    if any(not 0 < m < 32 for m in out):
        raise argparse.ArgumentTypeError(f"expected bitmasks 1..31, comma-separated, got '{text}'")
    return out


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
    p.add_argument("--variants", type=_variants, default=_variants("finish_warps=2"),
                   help="TUNING settings timed on the default launch shape: key=value[;key=value],...")
    p.add_argument("--ablate", type=_masks, default=_masks("1,2,4,8,16,31"),
                   help="stream-kernel stages to leave out of the plain update, as bitmasks (see above); "
                   "'' for none")
    p.add_argument("--fresh", action="store_true",
                   help="new random activations every batch (excerpts keep entering the top-K lists, as in a "
                   "recording), instead of two tensors alternating")
    p.add_argument("--split", action="store_true",
                   help="also report the stream, excerpt and finish kernels' own times (torch.profiler)")
    p.add_argument("--no-fused", action="store_true", help="time the plain update only")
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
    result = {"env": bench.environment(device, dtype), "fresh": args.fresh, "rows": []}
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
        runs = [(dict(block_n=bn, programs_per_sm=pps, num_warps=nw, chunk=chunk), 0)
                for bn, pps, nw, chunk in args.configs]
        runs += [(v, 0) for v in args.variants] + [({}, m) for m in args.ablate]
        for overrides, ablate in runs:
            tu.TUNING.update(default)
            tu.TUNING.update(overrides)
            row = dict(base, block_n=tu.TUNING["block_n"], programs_per_sm=tu.TUNING["programs_per_sm"],
                       num_warps=tu.TUNING["num_warps"], chunk=tu.TUNING["chunk"], tuning=dict(tu.TUNING),
                       ablate=ablate)
            label = (f"block_n={row['block_n']:3d} programs/SM={row['programs_per_sm']} warps={row['num_warps']} "
                     f"chunk={row['chunk']:2d}" + "".join(f" {k}={v}" for k, v in overrides.items()
                                                          if k not in ("block_n", "programs_per_sm", "num_warps", "chunk"))
                     + (f" ablate={ablate}" if ablate else ""))
            try:
                tu._ABLATE = ablate
                up = time_update(n, B, T, args.layers, args.reps, dtype, device, False, args.fresh, args.split)
                row["update_ms"] = up.pop("ms")
                row.update({f"update_{k}": v for k, v in up.items()})
                if not ablate and not args.no_fused:
                    fu = time_update(n, B, T, args.layers, args.reps, dtype, device, True, args.fresh, args.split)
                    row["fused_ms"] = fu.pop("ms")
                    row.update({f"fused_{k}": v for k, v in fu.items()})
            except Exception as exc:  # a shape the compiler refuses (registers, shared memory)
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"  {label}: {row['error']}", flush=True)
                result["rows"].append(row)
                _write(result, args.out)
                continue
            finally:
                tu._ABLATE = 0
            row["update_GBps"] = nbytes / (row["update_ms"] / 1e3) / 1e9
            row["update_of_copy"] = row["update_GBps"] / copy
            line = (f"  {label}: update {row['update_ms']:.3f} ms ({row['update_GBps']:,.0f} GB/s, "
                    f"{row['update_of_copy']:.2f} of copy)")
            if "update_stream_ms" in row:
                line += (f" [stream {row['update_stream_ms']:.3f} + excerpt {row['update_excerpt_ms']:.3f} + "
                         f"finish {row['update_finish_ms']:.3f} ms]")
            if "fused_ms" in row:
                line += (f"; fused gelu+update {row['fused_ms']:.3f} ms vs torch gelu {base['gelu_ms']:.3f} "
                         f"(+{row['fused_ms'] - base['gelu_ms']:.3f}) vs gelu then update "
                         f"{base['gelu_ms'] + row['update_ms']:.3f}")
                if "fused_stream_ms" in row:
                    line += (f" [stream {row['fused_stream_ms']:.3f} + excerpt {row['fused_excerpt_ms']:.3f} + "
                             f"finish {row['fused_finish_ms']:.3f} ms]")
            print(line, flush=True)
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
