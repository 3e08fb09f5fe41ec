"""`neuronatlas bench`: how fast recording runs on this machine, next to the forward pass alone.

For one model (real weights, random weights from its config, or a built-in GPT-2 shape), each
batch size, eager and compiled:

* forward-only tokens/s: the base model, no hooks;
* recording tokens/s per reduction backend: the recorder's hot loop (plan the batch, forward pass
  with one hook per layer calling the update, flags read one batch late), without store I/O;
  and its ratio to forward-only in the same mode;
* per-batch update time of each backend alone (all layers, steady state: after the prefix and
  the first batches hardly any excerpt enters a top-K), the kernel's achieved GB/s (activation
  bytes read / time) against a device-to-device copy measured in the same run, and what the
  bytes predict: reading every activation once at the copy's bandwidth;
* peak device memory of each measurement.

`benchmarks/record_throughput.py` runs the same measurement over GPT-2 shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from engine.errors import UserError

SHAPES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_inner=256),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
"""Built-in model shapes (`--model shape:NAME`): GPT-2 configs with random weights, no download."""


@dataclass
class BenchConfig:
    """What one benchmark run measures."""

    model: str
    """Hub id, local path, .gguf, 'smollm2', or shape:NAME (see SHAPES)."""
    random_weights: bool = False
    """Build the model from its config with random weights (shape:NAME always does)."""
    batch_sizes: list[int] = field(default_factory=lambda: [256])
    """Excerpts per forward pass; each is measured."""
    modes: list[str] = field(default_factory=lambda: ["eager", "compiled"])
    """eager and/or compiled (torch.compile of the base model)."""
    backends: list[str] | None = None
    """Reduction backends to record with; None: torch, plus triton where it can run."""
    excerpt_len: int = 64
    """Tokens per excerpt."""
    top_k: int = 50
    """K of the recording (the other sizes are the recorder's defaults)."""
    quantile_prefix: int = 2048
    """Prefix excerpts; the timed batches come after it (the warm-up runs through it)."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    steps: int = 10
    """Timed batches per measurement."""
    warmup: int = 3
    """Untimed batches after the prefix, beside one that every measurement runs first (a compiled
    forward pass compiles there: compilation is never timed)."""
    compile_backend: str | None = None
    """torch.compile backend; None: inductor on CUDA, aot_eager on CPU (inductor's C++ build of
    a model takes minutes there; the numbers are then about tracing, not code generation)."""


# ---------------------------------------------------------------------------------------------
# Models


def build_model(name: str, device: torch.device, dtype: torch.dtype, random_weights: bool):
    """A LoadedModel: real weights through engine.models, or random weights from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    from engine import models

    if not name.startswith("shape:") and not random_weights:
        return models.load_model(name, device, dtype)
    if name.startswith("shape:"):
        shape = name.split(":", 1)[1]
        if shape not in SHAPES:
            raise UserError(f"unknown shape '{shape}': use one of {', '.join('shape:' + s for s in SHAPES)}")
        config = GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[shape])
        display = f"{shape} shape (random weights)"
    else:
        path, gguf, display = models._resolve(name)
        models._check_exists(path)
        models._check_hub(name, path, gguf, None)  # offline and not cached: one line at once, no retries
        try:
            config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        except Exception as exc:  # OSError, ValueError, and whatever a damaged file makes a parser raise
            raise UserError(f"cannot load the config of '{name}': {models._first_line(exc)}") from None
        display = f"{display} (random weights)"
    arch = models.architecture_for(getattr(config, "model_type", "unknown"))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype=dtype).eval()
    layers = models._attr(model.base_model, arch.layers)
    modules = [models._attr(block, arch.module) for block in layers]
    n_neurons = [models._width(m, arch, config) for m in modules]
    d_model = int(getattr(config, "hidden_size", getattr(config, "n_embd", 0)) or 0)
    identity = {"name": display, "model_type": config.model_type, "architecture": arch.name,
                "n_layers": len(modules), "n_neurons": n_neurons, "d_model": d_model,
                "n_parameters": int(sum(p.numel() for p in model.parameters())),
                "vocab_size": int(config.vocab_size), "context": models.context_length(config)}
    return models.LoadedModel(model, None, arch, modules, n_neurons, identity)


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _timed(device: torch.device, fn, n: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    _sync(device)
    return time.perf_counter() - t0


def _compiled(base, cfg: BenchConfig, device: torch.device):
    # A fresh compile per measurement: dynamo does not guard on hooks added after compiling, so
    # a reused wrapper would run the graph of an earlier measurement.
    torch._dynamo.reset()
    return torch.compile(base, backend=_backend_name(cfg, device))


def _backend_name(cfg: BenchConfig, device: torch.device) -> str:
    return cfg.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")


def _spec(cfg: BenchConfig, lm):
    from kernels import reference as ref

    return ref.ReductionSpec(excerpt_len=cfg.excerpt_len, top_k=cfg.top_k, negatives=lm.arch.gated,
                             quantile_prefix=cfg.quantile_prefix)


def measure_forward(lm, fwd, pool, device, cfg: BenchConfig) -> tuple[float, int | None]:
    """Tokens/s of the forward pass alone and its peak memory."""
    B, T = pool[0].shape
    _reset_peak(device)
    with torch.inference_mode():
        if fwd is not lm.model.base_model:  # compiled: the first call compiles, and may fail
            try:
                fwd(input_ids=pool[0], use_cache=False)
            except Exception as exc:  # a backend that cannot run here (a missing package, a compiler)
                exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # dynamo's wrapper says little
                text = str(exc).strip()
                raise UserError(f"torch.compile with backend {_backend_name(cfg, device)!r} failed: "
                                f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}") from None
        for i in range(cfg.warmup + 1):
            fwd(input_ids=pool[i % len(pool)], use_cache=False)
        t = _timed(device, lambda i: fwd(input_ids=pool[i % len(pool)], use_cache=False), cfg.steps)
    return cfg.steps * B * T / t, _peak(device)


def measure_recording(lm, backend: str, mode: str, pool, device, dtype, cfg: BenchConfig, fused_plan=None):
    """Tokens/s of the recorder's hot loop with `backend`, and its peak memory. With `fused_plan`
    (backend triton-fused), each layer's activation step is the kernel, as with --fuse-activation."""
    from engine.recorder import LateFlags, SideStream, attach, select_updates
    from kernels import reference as ref

    B, T = pool[0].shape
    spec = _spec(cfg, lm)
    _reset_peak(device)
    updates = select_updates("triton" if backend in (FUSED, SIDE) else backend, device, mode == "compiled")
    side = SideStream(device) if backend == SIDE else None
    with torch.inference_mode():  # as the recorder's state (engine.recorder.record)
        states = [ref.LayerState.empty(spec, n, dtype, device) for n in lm.n_neurons]
        current: dict = {"sample": ref.RandomSample.empty(spec, device), "first": 0}
    late_flags = LateFlags(device)
    flags: list[torch.Tensor] = []
    base = lm.model.base_model
    detach = attach(lm, states, spec, updates, current, flags, fused_plan=fused_plan if backend == FUSED else None,
                    side=side)
    fwd = _compiled(base, cfg, device) if mode == "compiled" else base

    def step(i):
        batch, current["sample"] = ref.plan_batch(spec, current["sample"], current["first"], B, device)
        current["batch"] = batch
        flags.clear()
        use_graph = mode == "compiled" and not batch.completes_prefix
        current["graph"] = use_graph
        (fwd if use_graph else base)(input_ids=pool[i % len(pool)], use_cache=False)
        if side is not None:
            side.join()
        if use_graph and updates.graph_counts:
            for s in states:
                s.count += B * T
        late_flags.push(torch.stack(flags), current["first"])  # as the recorder does
        current["first"] += B

    try:
        with torch.inference_mode():
            # The prefix, then warmup + 1 batches, as measure_forward: the batch that completes the
            # prefix runs outside the graph, so the first compiled call comes after it.
            for i in range(math.ceil(spec.quantile_prefix / B) + cfg.warmup + 1):
                step(i)
            t = _timed(device, step, cfg.steps)
    finally:
        detach()
    return cfg.steps * B * T / t, _peak(device)


def measure_update(backend: str, n: int, B: int, dtype, device, cfg: BenchConfig, lm) -> dict:
    """Milliseconds of one layer's update alone: the first batch (every excerpt a candidate) and
    the steady state (after the prefix, on activations already seen: nothing enters)."""
    from kernels import reference as ref
    from kernels import select_update

    spec = _spec(cfg, lm)
    update = select_update(backend, device)
    T = cfg.excerpt_len
    state = ref.LayerState.empty(spec, n, dtype, device)
    sample = ref.RandomSample.empty(spec, device)
    gen = torch.Generator(device=device).manual_seed(0)
    acts = [torch.randn((B, T, n), generator=gen, device=device).to(dtype) for _ in range(2)]
    first = 0

    def step(i):
        nonlocal sample, first
        batch, sample = ref.plan_batch(spec, sample, first, B, device)
        update(state, spec, acts[i % 2], batch)
        first += B

    with torch.inference_mode():
        t_first = _timed(device, step, 1)
        for i in range(math.ceil(spec.quantile_prefix / B) + cfg.warmup):
            step(i)
        # plan_batch's host work is timed too: it is part of every batch.
        t = _timed(device, step, cfg.steps) / cfg.steps
    return {"first_ms": 1e3 * t_first, "steady_ms": 1e3 * t}


def measure_copy(nbytes: int, dtype, device, cfg: BenchConfig) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    el = torch.empty((), dtype=dtype).element_size()
    x = torch.empty(nbytes // el, dtype=dtype, device=device).normal_()
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    t = _timed(device, lambda i: y.copy_(x), max(3, cfg.steps))
    return 2 * nbytes * max(3, cfg.steps) / t / 1e9


# ---------------------------------------------------------------------------------------------
# The whole measurement


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return f"CPU: {cpu} ({os.cpu_count()} cores)"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    tuning = None
    if triton_version is not None and device.type == "cuda":
        try:
            from kernels.triton_update import TUNING

            tuning = dict(TUNING)
        except ValueError:  # a malformed NEURONATLAS_TRITON_TUNING: the triton backend reports it
            pass
    return {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": triton_version, "triton_tuning": tuning,
            "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


FUSED = "triton-fused"
"""The recording backend where each layer's activation step is the kernel (`--fuse-activation`)."""
SIDE = "triton-side"
"""The triton backend with the updates on a second stream (`--side-stream`; eager only)."""
BACKENDS = ("torch", "triton", FUSED, SIDE)
"""What --backends takes."""
SEPARATE = ("torch", "triton")
"""Backends whose update runs apart from the forward pass, so that it can be timed alone."""


def default_backends(device: torch.device, fusable: bool) -> list[str]:
    from kernels import triton_status

    if triton_status(device) is not None:
        return ["torch"]
    return ["torch", "triton"] + ([SIDE] if device.type == "cuda" else []) + ([FUSED] if fusable else [])


def run(cfg: BenchConfig, log=print) -> dict:
    """Measure `cfg`; returns {"env", "model", "rows", "updates"} (what --out writes as JSON)."""
    from engine.models import parse_dtype
    from engine.recorder import check_context, check_options, resolve_device

    # Each batch size, mode and backend is measured once, in the order given.
    cfg = dataclasses.replace(cfg, batch_sizes=list(dict.fromkeys(cfg.batch_sizes)),
                              modes=list(dict.fromkeys(cfg.modes)),
                              backends=None if cfg.backends is None else list(dict.fromkeys(cfg.backends)))
    # The options that record takes too are checked by record's own rules.
    check_options(excerpt_len=cfg.excerpt_len, top_k=cfg.top_k, quantile_prefix=cfg.quantile_prefix)
    if cfg.steps < 1 or cfg.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if not cfg.modes:
        raise UserError("--modes must name eager and/or compiled")
    if cfg.backends is not None and not cfg.backends:
        raise UserError("--backends must name at least one backend (or leave it out for the default)")
    if cfg.compile_backend is not None and "compiled" in cfg.modes:
        from torch import _dynamo  # (`import torch._dynamo` here would make torch a local name)

        known = _dynamo.list_backends(exclude_tags=())
        if cfg.compile_backend not in known:
            raise UserError(f"--compile-backend {cfg.compile_backend!r} is not a torch.compile backend here "
                            f"(known: {', '.join(b for b in known if 'TESTING' not in b)})")
    device = resolve_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)
    from kernels import select_update

    for b in cfg.backends or []:
        if b not in BACKENDS:
            raise UserError(f"unknown backend '{b}': use {', '.join(BACKENDS)}")
        try:
            select_update("triton" if b in (FUSED, SIDE) else b, device)
        except ValueError as exc:  # its advice names record's --backend
            raise UserError(str(exc).replace("--backend ", "--backends ")) from None
        if b == SIDE and device.type != "cuda":
            raise UserError(f"backend {SIDE} needs a CUDA device, not '{device}'")
    for m in cfg.modes:
        if m not in ("eager", "compiled"):
            raise UserError(f"unknown mode '{m}': use eager and/or compiled")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise UserError("--batch-sizes must list positive integers")
    lm = build_model(cfg.model, device, dtype, cfg.random_weights)
    check_context(cfg.excerpt_len, False, lm.identity.get("context"))  # bench feeds no BOS token
    from engine import fuse

    fused_plan, why = fuse.plan_fusion(lm)
    backends = cfg.backends or default_backends(device, fused_plan is not None)
    if FUSED in backends and fused_plan is None:
        raise UserError(f"backend {FUSED}: {why}")
    el = torch.empty((), dtype=dtype).element_size()
    T = cfg.excerpt_len
    _check_memory(cfg, lm, dtype, device)
    vocab = int(lm.identity.get("vocab_size") or len(lm.tokenizer))
    out = {"env": environment(device, dtype), "config": dataclasses.asdict(cfg) | {"backends": backends},
           "model": {k: lm.identity.get(k) for k in ("name", "architecture", "n_layers", "n_neurons", "n_parameters")},
           "rows": [], "updates": []}
    log(f"{out['model']['name']}: {lm.identity['n_layers']} layers, {sum(lm.n_neurons):,} neurons, "
        f"{_count(lm.identity['n_parameters'])} parameters, {out['env']['dtype']} on {out['env']['device']}")
    for B in cfg.batch_sizes:
        gen = torch.Generator().manual_seed(B)
        pool = [torch.randint(0, vocab, (B, T), generator=gen).to(device) for _ in range(4)]
        act_bytes = sum(B * T * n * el for n in lm.n_neurons)
        for mode in cfg.modes:
            fwd = _compiled(lm.model.base_model, cfg, device) if mode == "compiled" else lm.model.base_model
            tok, peak = measure_forward(lm, fwd, pool, device, cfg)
            row = {"batch": B, "mode": mode, "forward_tok_s": tok, "forward_peak_bytes": peak}
            log(f"  batch {B} {mode}: forward {tok:,.0f} tok/s")
            for backend in backends:
                if backend == SIDE and mode == "compiled":  # eager only (engine.recorder.SideStream)
                    row.update({f"record_{SIDE}_tok_s": None, f"record_{SIDE}_ratio": None,
                                f"record_{SIDE}_peak_bytes": None})
                    continue
                rtok, rpeak = measure_recording(lm, backend, mode, pool, device, dtype, cfg, fused_plan)
                row[f"record_{backend}_tok_s"] = rtok
                row[f"record_{backend}_ratio"] = rtok / tok
                row[f"record_{backend}_peak_bytes"] = rpeak
                log(f"  batch {B} {mode}: record with {backend} {rtok:,.0f} tok/s ({rtok / tok:.3f} of forward)")
            out["rows"].append(row)
        widest = max(lm.n_neurons)
        copy_gbs = measure_copy(B * T * widest * el, dtype, device, cfg)
        upd = {"batch": B, "activation_bytes_per_batch": act_bytes, "copy_GBps": copy_gbs,
               "predicted_ms": 1e3 * act_bytes / (copy_gbs * 1e9)}
        for backend in [b for b in backends if b in SEPARATE]:  # the others' updates are the triton one's
            per_width = {n: measure_update(backend, n, B, dtype, device, cfg, lm) for n in sorted(set(lm.n_neurons))}
            steady = sum(per_width[n]["steady_ms"] for n in lm.n_neurons)
            upd[f"{backend}_first_ms"] = sum(per_width[n]["first_ms"] for n in lm.n_neurons)
            upd[f"{backend}_ms"] = steady
            upd[f"{backend}_GBps"] = act_bytes / (steady / 1e3) / 1e9
        out["updates"].append(upd)
    return out


def _check_memory(cfg: BenchConfig, lm, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a batch size whose recording would not fit beside the loaded model (as record
    does), before anything is allocated for it: the largest one, with its 4 input batches."""
    from engine.recorder import _fmt_bytes, available_bytes, memory_plan

    B = max(cfg.batch_sizes)
    plan = memory_plan(_spec(cfg, lm), lm.n_neurons, dtype, 0, 0, B, lm.identity.get("d_model") or 0)
    need = plan["state"] + plan["batch"] + 4 * B * cfg.excerpt_len * 8
    avail = available_bytes(device)
    if need > avail:
        raise UserError(f"batch {B} needs about {_fmt_bytes(need)} on {device} beside the model but "
                        f"{_fmt_bytes(avail)} is free; lower --batch-sizes")


def _num(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(result: dict) -> str:
    """The measurement as two text tables (throughput, then the update alone)."""
    backends = result["config"]["backends"]
    env = result["env"]
    tuning = env.get("triton_tuning")
    lines = [f"{result['model']['name']} | {env['device']} | {env['dtype']} | torch {env['torch']} | "
             f"triton {env['triton']} | transformers {env['transformers']}"
             + (" | triton launch " + ",".join(f"{k}={v}" for k, v in tuning.items()) if tuning else ""), ""]
    head = ["batch", "mode", "forward tok/s"]
    for b in backends:
        head += [f"record {b} tok/s", "ratio"]
    head += ["peak mem (GiB) fwd/" + "/".join(backends)]
    rows = [head]
    for r in result["rows"]:
        cells = [str(r["batch"]), r["mode"], _num(r["forward_tok_s"])]
        for b in backends:
            cells += [_num(r[f"record_{b}_tok_s"]), _num(r[f"record_{b}_ratio"], "{:.3f}")]
        peaks = [r["forward_peak_bytes"]] + [r[f"record_{b}_peak_bytes"] for b in backends]
        cells.append("/".join(_num(p and p / 2**30, "{:.1f}") for p in peaks))
        rows.append(cells)
    lines += _fmt_rows(rows)
    lines.append("")
    head = ["batch", "act. bytes/batch", "copy GB/s", "predicted ms"]
    backends = [b for b in backends if b in SEPARATE]  # no separate update to time
    for b in backends:
        head += [f"{b} ms (first)", f"{b} ms", f"{b} GB/s", "of copy"]
    rows = [head]
    for u in result["updates"]:
        cells = [str(u["batch"]), f"{u['activation_bytes_per_batch'] / 2**20:,.1f} MiB", _num(u["copy_GBps"], "{:,.3g}"),
                 _num(u["predicted_ms"], "{:.3f}")]
        for b in backends:
            cells += [_num(u[f"{b}_first_ms"], "{:.2f}"), _num(u[f"{b}_ms"], "{:.3f}"), _num(u[f"{b}_GBps"], "{:,.3g}"),
                      _num(u[f"{b}_GBps"] / u["copy_GBps"], "{:.3g}")]
        rows.append(cells)
    lines += _fmt_rows(rows)
    lines += ["", "predicted ms: every layer's activations read once at the copy's bandwidth (bytes read + "
              "written per second); ms: one batch's update of all layers, steady state; first: the first batch."]
    return "\n".join(lines)


def _fmt_rows(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]


# ---------------------------------------------------------------------------------------------
# CLI


def _count(n: int) -> str:
    """124M, 1.56B, 38.7k: a parameter count in three significant digits."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")] if text.strip() else []
    except ValueError:  # an empty item ("2,,3") too: a typo, not a list of two
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    p.add_argument("--model", required=default_model is None, default=default_model,
                   help="hub id, local directory, .gguf file, 'smollm2', or shape:NAME for a GPT-2 shape with "
                   f"random weights ({', '.join(SHAPES)})")
    p.add_argument("--random-weights", action="store_true", help="build the model from its config with random weights")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated (default: 256 on CUDA, 8 on CPU)")
    p.add_argument("--modes", type=_words, default=["eager", "compiled"], help="eager,compiled (default both)")
    p.add_argument("--backends", type=_words, default=None,
                   help="reduction backends to record with: torch, triton, triton-fused (the activation step is "
                   "the kernel, as record --fuse-activation), triton-side (the updates on a second CUDA stream, "
                   "as record --side-stream; eager only); default: torch, plus the others where they run")
    p.add_argument("--excerpt-len", type=int, default=64, help="tokens per excerpt (default 64)")
    p.add_argument("--top-k", type=int, default=50, help="K of the recording (default 50)")
    p.add_argument("--quantile-prefix", type=int, default=2048,
                   help="prefix excerpts (default 2048); timing starts after the prefix")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--steps", type=int, default=10, help="timed batches per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches after the prefix (default 3)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--out", default=None, help="also write the measurement as JSON to this file")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from engine.recorder import resolve_device

    device = resolve_device(args.device)
    if args.batch_sizes is not None and not args.batch_sizes:
        raise UserError("--batch-sizes must list positive integers")
    sizes = args.batch_sizes or ([256] if device.type == "cuda" else [8])
    return BenchConfig(model=args.model, random_weights=args.random_weights, batch_sizes=sizes, modes=args.modes,
                       backends=args.backends, excerpt_len=args.excerpt_len, top_k=args.top_k,
                       quantile_prefix=args.quantile_prefix, dtype=args.dtype, device=args.device,
                       steps=args.steps, warmup=args.warmup, compile_backend=args.compile_backend)


def check_out(path: str) -> None:
    """Refuse an --out that cannot be written, before anything is measured (it is written last):
    an existing file is opened for appending (nothing changes), a new one is created and removed."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise UserError(f"--out '{path}' is a directory; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"cannot write '{path}': '{p.parent}' is not a directory")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
        if not existed:
            os.unlink(p)
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror or exc}") from None


def write_json(result: dict, path: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror or exc}") from None


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure recording throughput against the forward pass on this machine",
                       description="Measure forward-only and recording tokens/s (eager and compiled), their ratio, "
                       "the reduction's time and bandwidth, and peak device memory, for a model on this machine.")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.out is not None and not args.out.strip():
        raise UserError("--out needs a file name")
    if args.out:
        check_out(args.out)
    result = run(cfg, log=lambda m: print(m, file=sys.stderr))
    print(table(result))
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0
