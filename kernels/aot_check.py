"""Compile the Triton kernels for a GPU architecture on a machine that has no GPU.

    python -m kernels.aot_check [--arch 90] [--dtype bf16 ...]

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler: a kernel can
pass every interpreter test and still fail to lower to PTX (a type the backend rejects, a layout
it cannot convert, too many registers or too much shared memory). This check drives the real
launch path (`triton_update.update_layer` on CPU tensors) with the three kernels swapped for
recorders of their arguments, then hands each recorded launch to `triton.compile` for `--arch`
(ptxas ships inside the triton wheel). It launches nothing; it needs no GPU and no driver.

It covers the features a layer can switch on: the negatives (bottom-K) list, the random sample,
the quantile samples and histogram (before and after the prefix completes), in each dtype, and
each activation function of the path that produces the activations.
Exit 0 and one line per compiled kernel, or 1 and the first failure. Each line gives the cubin's
registers per thread and spill stack (cuobjdump, also in the wheel) at the stream kernel's
`--block-n` (default 64; the GPU default is `TUNING`'s 512) and `--num-warps`, and at the excerpt
kernel's GPU shape (`TUNING`'s excerpt_warps, one neuron per thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter would replace the compiler
    del os.environ["TRITON_INTERPRET"]

import torch  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1", torch.int8: "i8"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `k[grid](*args, **kw)` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))
        return launch


def _signature(fn, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one recorded launch, as `triton.compile` takes them."""
    names = fn.arg_names
    sig, const = {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            const[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, const, options


def _attrs(fn, args, kwargs) -> dict:
    """The specialisation the JIT gives a launch on a GPU: pointers (PyTorch's allocations are
    16-byte aligned) and integers divisible by 16 are marked so, except `do_not_specialize` ones.
    Without it the loads are not vectorised and the register counts are not the GPU's."""
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    skip = set(getattr(fn, "do_not_specialize", ()) or ())
    attrs = {}
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr or name in skip or i in skip:
            continue
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def record_launches(dtype: torch.dtype, negatives: bool, T: int = 64, top_k: int = 50, random_k: int = 50,
                    quantile_k: int = 10, hist_bins: int = 64, n: int = 200, B: int = 24,
                    block_n: int = 64, finish_block_n: int = 16, activation: str | None = None,
                    skip: int = 0) -> list:
    """The kernel launches of a few batches of one layer, driven through `update_layer` on the CPU
    (its state logic runs for real, so each launch has the arguments a GPU run would give it).
    The sizes default to the recorder's defaults; the block sizes to `default_config` on CUDA.
    With `activation`, the path that produces the activations (`activate_update`) instead."""
    from kernels import reference as ref
    from kernels import triton_update as tu

    launches: list = []
    originals = tu._stream_kernel, tu._excerpt_kernel, tu._finish_kernel
    tu._stream_kernel = _Recorder(originals[0], launches)
    tu._excerpt_kernel = _Recorder(originals[1], launches)
    tu._finish_kernel = _Recorder(originals[2], launches)
    try:
        spec = ref.ReductionSpec(excerpt_len=T, top_k=top_k, negatives=negatives, random_k=random_k,
                                 quantile_k=quantile_k, quantile_prefix=B + B // 2, hist_bins=hist_bins, seed=0)
        state = ref.LayerState.empty(spec, n, dtype, torch.device("cpu"))
        sample = ref.RandomSample.empty(spec, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        for k in range(3):  # before, across and after the end of the quantile prefix
            batch, sample = ref.plan_batch(spec, sample, k * B, B, torch.device("cpu"))
            acts = torch.randn(B, skip + T, n, generator=gen).to(dtype)
            if batch.completes_prefix:
                # The launches on both sides of the prefix end; boundaries come from the reference.
                state.prefix_max.copy_(torch.randn(state.prefix_max.shape, generator=gen))
            tuning = dict(block_n=block_n, finish_block_n=finish_block_n)
            if activation is None:
                tu.update_layer(state, spec, acts, batch, **tuning)
            else:
                up = acts.clone() if activation.endswith("_mul") else None
                tu.activate_update(state, spec, acts, up, activation, batch, skip=skip, **tuning)
    finally:
        tu._stream_kernel, tu._excerpt_kernel, tu._finish_kernel = originals
    return launches


def _wheel_tool(name: str, option: str, cubin: bytes) -> str:
    """The output of one of the NVIDIA tools that ship in the Triton wheel (cuobjdump, nvdisasm)
    run on a cubin ('' if the wheel has no such tool)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, option, f.name], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> str:
    """"REG:n STACK:n ..." of a cubin, by the cuobjdump that ships in the Triton wheel ('' if absent)."""
    out = _wheel_tool("cuobjdump", "--dump-resource-usage", cubin)
    found = [w for w in out.split() if w.startswith(("REG:", "STACK:", "LOCAL:"))]
    return " ".join(dict.fromkeys(found))


def sass_loops(cubin: bytes) -> str:
    """The loops of a cubin's SASS (nvdisasm, in the Triton wheel), in address order, as
    "instructions/global loads/barriers" per loop body, inner loops counted inside their outer
    ones; then the whole kernel's instructions and barriers ('' without nvdisasm). A loop that
    stores to global memory gets a fourth number: the global loads issued before its first store
    (a load after a store is not moved above it, so a loop that stores after each load keeps one
    load in flight). A static view: what a loop iteration issues, not how long it takes."""
    import re

    text = _wheel_tool("nvdisasm", "-c", cubin)
    if not text:
        return ""
    labels, code, pending = {}, [], []
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            code.append((addr, m.group(2)))
    loops = []
    for addr, ins in code:
        m = re.search(r"BRA .*`\((\.L_x_\d+)\)", ins)
        if m and labels.get(m.group(1), addr + 1) < addr:
            body = [i for a, i in code if labels[m.group(1)] <= a <= addr]
            loads = sum(bool(re.search(r"\bLDG", i)) for i in body)
            bars = sum("BAR.SYNC" in i for i in body)
            stores = [k for k, i in enumerate(body) if re.search(r"\bSTG", i)]
            lead = f"/{sum(bool(re.search(r'LDG', i)) for i in body[:stores[0]])}" if stores else ""
            loops.append((labels[m.group(1)], f"{len(body)}/{loads}/{bars}{lead}"))
    total_bars = sum("BAR.SYNC" in i for _, i in code)
    return (f"loops (instr/LDG/BAR[/LDG before the first STG]): {' '.join(v for _, v in sorted(loops))}; "
            f"{len(code)} instructions, {total_bars} barriers")


def compile_all(arch: int, dtypes: list[torch.dtype], log=print, num_warps: int = 4, sass: bool = False,
                **sizes) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen: set = set()
    n = 0
    from kernels.triton_update import ACTIVATIONS, TUNING

    runs = [(negatives, None, 0) for negatives in (True, False)]
    runs += [(True, activation, 1) for activation in ACTIVATIONS]  # where activations are produced
    for dtype in dtypes:
        for negatives, activation, skip in runs:
            for fn, args, kwargs in record_launches(dtype, negatives, activation=activation, skip=skip,
                                                    **sizes):
                if fn.__name__ == "_stream_kernel":
                    kwargs = dict(kwargs, num_warps=num_warps)
                elif fn.__name__ == "_excerpt_kernel":  # its GPU shape: one neuron per thread
                    warps = TUNING["excerpt_warps"]
                    kwargs = dict(kwargs, BLOCK_N=32 * warps, num_warps=warps)
                sig, const, options = _signature(fn, args, kwargs)
                key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())))
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.perf_counter()
                compiled = triton.compile(ASTSource(fn, sig, const, _attrs(fn, args, kwargs)), target=target,
                                          options=options)
                md = compiled.metadata
                feats = ",".join(f"{k}={v}" for k, v in sorted(const.items())
                                 if k in ("NEG", "HIST", "QUANT", "RANDOM", "BLOCK_N", "ACT", "SKIP"))
                log(f"sm_{arch} {fn.__name__} {_TYPES[dtype]} {feats}: "
                    f"{len(compiled.asm['cubin']):,} B cubin, {md.shared:,} B shared, "
                    f"{resources(compiled.asm['cubin'])}, {time.perf_counter() - t0:.1f} s")
                if sass:
                    log(f"    {sass_loops(compiled.asm['cubin'])}")
                n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    p.add_argument("--dtype", action="append", choices=["bf16", "fp16", "fp32"],
                   help="activation dtypes to compile for (default all three)")
    p.add_argument("--excerpt-len", type=int, default=64, help="tokens per excerpt (default 64)")
    p.add_argument("--neurons", type=int, default=200,
                   help="layer width (default 200; a multiple of 16 such as GPT-2's 3072 gets the divisibility "
                   "hints a GPU launch gets, hence the GPU's register counts)")
    p.add_argument("--top-k", type=int, default=50, help="top (and bottom) excerpts per neuron (default 50)")
    p.add_argument("--random-k", type=int, default=50, help="random sample size (default 50)")
    p.add_argument("--block-n", type=int, default=64, help="stream kernel's BLOCK_N (default 64)")
    p.add_argument("--num-warps", type=int, default=4, help="stream kernel's warps (default 4)")
    p.add_argument("--sass", action="store_true",
                   help="also print each kernel's loops from its SASS: instructions, global loads and barriers per "
                   "iteration")
    a = p.parse_args(argv)
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = [table[d] for d in (a.dtype or ["bf16", "fp16", "fp32"])]
    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}")
    try:
        from kernels import triton_update

        n = compile_all(a.arch, dtypes, num_warps=a.num_warps, sass=a.sass, T=a.excerpt_len, n=a.neurons,
                        top_k=a.top_k, random_k=a.random_k, block_n=a.block_n)
    except Exception as exc:  # the point of the check: report the compiler's complaint
        first = str(exc).strip().splitlines()
        print(f"error: compiling for sm_{a.arch} failed: {type(exc).__name__}: {first[0] if first else ''}",
              file=sys.stderr)
        return 1
    print(f"{n} kernel variants compiled for sm_{a.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
