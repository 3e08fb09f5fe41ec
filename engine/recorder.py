"""The recording loop: one forward pass per batch, every layer reduced where it is produced.

A forward hook on each layer's neuron module hands the activation tensor [B, T, N] to the layer's
reduction (`kernels.reference.update_layer`, or a fused kernel) and drops it: no activation tensor
leaves the device, and nothing is read back to the host per layer. The only host reads are a
non-finite flag per batch (read one batch late, so the device never waits) and the state itself at
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import store as st
from engine.corpus import Corpus, load_corpus
from engine.errors import UserError
from engine.models import LoadedModel, load_model, load_tokenizer, parse_dtype
from kernels import reference as ref


@dataclass
class RecordConfig:
    """Everything `neuronatlas record` takes."""

    model: str = "smollm2"
    """Hub id, local directory, .gguf file, or the embedded default alias."""
    corpus: str = "stdlib"
    """Corpus source (see engine.corpus.documents)."""
    out: str = "store"
    """Directory of the Zarr store."""
    revision: str | None = None
    """Model revision on the hub."""
    text_field: str = "text"
    """Field of .jsonl/.parquet/hf rows that holds the text."""
    excerpt_len: int = 64
    """Tokens per excerpt."""
    top_k: int = 50
    """Top (and bottom) excerpts kept per neuron."""
    random_k: int = 50
    """Size of the random sample."""
    quantile_k: int = 10
    """Excerpts sampled per quantile bucket."""
    quantile_prefix: int = 2048
    """Excerpts that set quantile boundaries (capped at a quarter of the corpus)."""
    hist_bins: int = 64
    """Histogram bins."""
    negatives: bool | None = None
    """Record most negative excerpts; None = yes for gated models."""
    seed: int = 0
    """Seed of the sampling priorities."""
    batch_size: int = 64
    """Excerpts per forward pass."""
    max_excerpts: int | None = None
    """Stop after this many excerpts."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    dtype: str = "auto"
    """Model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."""
    bos: str = "auto"
    """Prepend BOS: yes, no, or auto (when the tokenizer adds it by default)."""
    checkpoint_every: float = 300.0
    """Seconds between checkpoints."""
    backend: str = "auto"
    """Reduction backend: triton (fused kernels), torch (reference) or auto (triton on CUDA)."""
    fuse_activation: bool = False
    """Replace each layer's activation step by the Triton kernel that computes and records it in
    one read (`engine.fuse`); needs the triton backend. Layers it cannot replace are refused
    with a notice and recorded through the plain hooks."""
    compile: bool = False
    """Run the forward pass through torch.compile (with the triton backend the reductions are
    inside the compiled graph; with torch they run between its pieces)."""
    side_stream: bool = False
    """Run each layer's update on a second CUDA stream, beside the rest of the forward pass
    (`SideStream`); eager triton recording on CUDA only."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class Summary:
    """What a recording did."""

    excerpts: int
    tokens: int
    neurons: int
    layers: int
    seconds: float
    """Wall time of the whole command (loading included)."""
    tokens_per_s: float
    """Tokens recorded per second of the recording loop (forward, reductions, checkpoints)."""
    store_bytes: int
    resumed_from: int
    complete: bool

    def text(self, path: str) -> str:
        if self.complete and self.resumed_from >= self.excerpts:  # a rerun of a finished recording
            return (f"Nothing to do: {path} already holds the complete recording ({self.excerpts:,} excerpts, "
                    f"{self.tokens:,} tokens, {self.neurons:,} neurons in {self.layers} layers; "
                    f"{self.store_bytes / 2**20:.1f} MiB).")
        verb = "Recorded" if self.complete else "Stopped after"
        resumed = f" (resumed at excerpt {self.resumed_from:,})" if self.resumed_from else ""
        return (
            f"{verb} {self.excerpts:,} excerpts ({self.tokens:,} tokens){resumed} for "
            f"{self.neurons:,} neurons in {self.layers} layers in {self.seconds:.1f} s, recording at "
            f"{self.tokens_per_s:,.0f} tokens/s; store {path} holds {self.store_bytes / 2**20:.1f} MiB."
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device '{name}' is not supported: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but no CUDA GPU is available; use --device cpu")
    return dev


def use_bos(mode: str, tokenizer) -> bool:
    if mode not in ("auto", "yes", "no"):
        raise UserError(f"--bos must be auto, yes or no, not '{mode}'")
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "no":
        return False
    if mode == "yes":
        if bos is None:
            raise UserError("--bos yes, but the tokenizer has no BOS token")
        return True
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def vocab_strings(tokenizer) -> list[str]:
    """Each id's text as it appears inside a text, so that joining an excerpt's strings spells it.

    decode([i]) alone is not that for SentencePiece-style decoders (Llama 2, Mistral, Gemma): they
    drop the leading space of a sequence's first token, so "▁cat" would read "cat" and an excerpt
    "catsatonthemat". Each id is decoded after an anchor token instead, and the anchor's text taken
    off; special tokens, and any id whose text does not extend the anchor's, keep decode([i])."""
    n = len(tokenizer)
    plain = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids or [])
    anchor = None
    for probe in ("a", "x", "0", "The"):
        try:
            ids = tokenizer.encode(probe, add_special_tokens=False)
        except Exception:  # a tokenizer that cannot encode a probe has no anchor: decode([i]) stays
            ids = []
        if ids and ids[-1] not in special and plain[ids[-1]]:
            anchor = ids[-1]
            break
    if anchor is None:
        return plain
    head = plain[anchor]
    joined = tokenizer.batch_decode([[anchor, i] for i in range(n)], clean_up_tokenization_spaces=False)
    return [p if i in special or not j.startswith(head) else j[len(head):]
            for i, (p, j) in enumerate(zip(plain, joined))]


# ---------------------------------------------------------------------------------------------
# Memory


def memory_plan(spec: ref.ReductionSpec, n_neurons: list[int], act_dtype: torch.dtype,
                n_params: int, param_bytes: int, batch_size: int, d_model: int) -> dict[str, int]:
    """Bytes the device needs: per-neuron state, model, and one batch's transient tensors."""
    state = sum(ref.state_bytes(spec, n, act_dtype) for n in n_neurons)
    a = torch.empty((), dtype=act_dtype).element_size()
    T = spec.excerpt_len
    widest = max(n_neurons)
    # The reference update of the widest layer: fp32 copy + fp64 centred copies + sort buffers.
    transient = batch_size * T * widest * (4 + 3 * 8) + widest * (spec.top_k + batch_size) * 24
    forward = batch_size * T * (8 * d_model + 2 * widest) * a
    return {"state": state, "model": n_params * param_bytes, "batch": transient + forward,
            "total": state + n_params * param_bytes + transient + forward}


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Recording


class _Interrupt:
    """First Ctrl-C: finish the batch, checkpoint, stop. Second: stop at once (the store still
    holds its last committed checkpoint)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if os.name == "posix" and _is_main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
            self._old_term = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            # At once, as a kill would: the store's checkpoints are atomic, and raising here, in
            # the middle of a checkpoint's writes, leaves Zarr's I/O threads to print tracebacks.
            print("\ninterrupt: stopped at once; the store keeps its last checkpoint (run the same "
                  "command again to resume)", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print("\ninterrupt: finishing the batch and writing a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            signal.signal(signal.SIGTERM, self._old_term)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _identity(cfg: RecordConfig, lm: LoadedModel, corpus: Corpus, spec: ref.ReductionSpec,
              dtype: torch.dtype, bos: bool) -> dict:
    model = {k: lm.identity[k] for k in ("name", "gguf_file", "revision", "model_type",
                                          "architecture", "n_layers", "n_neurons", "weights")}
    identity = {"model": model, "dtype": str(dtype).removeprefix("torch."), "bos": bos,
                "corpus": corpus.description, "spec": dataclasses.asdict(spec)}
    return json.loads(json.dumps(identity))  # as the store will give it back (lists, not tuples)


def _same_local_model(old_run_model: dict, old_name, new_name, new_local: str | None) -> bool:
    """Whether the store's model `old_name` and the asked `new_name` (a local model at `new_local`)
    are one local model spelled two ways: models/x, ./models/x/ and /abs/models/x, from any working
    directory. Hub ids are compared as they are (new_local None). The weights' fingerprint, compared
    apart, checks the content."""
    if new_local is None or not isinstance(old_name, str) or old_name == new_name:
        return False
    if isinstance(old_run_model.get("local_dir"), str):
        return old_run_model["local_dir"] == new_local
    # A store from before local_dir was kept: its name as typed, relative to a working directory
    # that is not known. The same path from here, or a relative name that ends the asked path.
    from engine.models import local_dir

    if local_dir(old_name) == new_local:
        return True
    old_parts = Path(os.path.normpath(old_name)).parts
    return (not Path(old_name).is_absolute() and ".." not in old_parts
            and Path(new_local).parts[-len(old_parts):] == old_parts)


def _check_identity(path: Path, identity: dict, new_local: str | None = None) -> dict:
    s = st.open_store(path)
    old = s.run.get("identity", {})
    if isinstance(old.get("model"), dict) and "weights" not in old["model"]:
        identity = dict(identity, model={k: v for k, v in identity["model"].items() if k != "weights"})  # older stores
    if isinstance(old.get("model"), dict) and _same_local_model(s.run.get("model") or {}, old["model"].get("name"),
                                                               identity["model"]["name"], new_local):
        identity = dict(identity, model=dict(identity["model"], name=old["model"]["name"]))

    def without_weights(model):
        return {k: v for k, v in model.items() if k != "weights"} if isinstance(model, dict) else model

    # The dtype before the weights: weights loaded in another dtype have another fingerprint.
    checks = [("model", without_weights(old.get("model")), without_weights(identity["model"])),
              ("dtype", old.get("dtype"), identity["dtype"])]
    # The spec before the corpus: a changed --excerpt-len also changes the corpus's token hash, and
    # the flag is what the user can act on.
    checks += [(key, old.get(key), identity[key]) for key in ("model", "bos", "spec", "corpus")]
    for key, have, want in checks:
        if have != want:
            if isinstance(have, dict) and isinstance(want, dict):
                diff = [k for k in want if have.get(k) != want[k]]
                detail = ", ".join(f"{key}.{k}: store has {have.get(k)!r}, asked {want[k]!r}" for k in diff[:2])
            else:
                detail = f"{key}: store has {have!r}, asked {want!r}"
            raise UserError(
                f"'{path}' holds another run ({detail}); use a new --out or the same settings to resume"
            )
    return s.progress


def _prepare_out(path: Path) -> bool:
    """True if `path` already holds a store. Raises if it holds anything else or cannot be
    written; creates nothing (the store is created once the model and corpus have loaded)."""
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--out '{path}' is a file, not a directory")
        if st.is_store(path):
            if not os.access(path, os.W_OK):
                raise UserError(f"cannot write to '{path}': permission denied")
            missing = [name for name in ("tokens", "vocab", "checkpoints") if not (path / name / "zarr.json").is_file()]
            if missing:  # left by a version that created stores in place, killed while creating
                raise UserError(f"'{path}' is a store whose creation was cut short (it has no '{missing[0]}' and "
                                "no recording): delete it, then run the same command again")
            return True
        if any(path.iterdir()):
            raise UserError(f"--out '{path}' is a non-empty directory that is not a neuronatlas store; choose another path")
        parent = path
    else:
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to '{path}': '{parent}' is not a writable directory")
    return False


def _host(t: torch.Tensor) -> np.ndarray:
    """A host copy (never a view: the device state keeps changing while a checkpoint is written)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().to("cpu", copy=True).numpy()


class LateFlags:
    """The per-batch non-finite flags (one per layer), read one batch late so that the host never
    waits for the batch it has just queued. On CUDA the copy to the host is queued right behind
    the batch's own work, into pinned memory, and waited for by an event: reading it waits for
    that batch only."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending = None

    def push(self, flag: torch.Tensor, first_id: int) -> None:
        """Hold this batch's flags; check the previous batch's (raises UserError on a NaN/inf)."""
        if self.device.type == "cuda":
            host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = (host, event)
        else:
            flag = (flag, None)
        previous, self._pending = self._pending, (flag, first_id)
        self._check(previous)

    def flush(self) -> None:
        """Check the last batch held (before a checkpoint and at the end)."""
        previous, self._pending = self._pending, None
        self._check(previous)

    @staticmethod
    def _check(pending) -> None:
        if pending is None:
            return
        (flag, event), first_id = pending
        if event is not None:
            event.synchronize()
        bad = flag.cpu().numpy()
        if bad.any():
            raise UserError(
                f"non-finite activation (NaN or inf) in layer {int(np.argmax(bad))}, batch starting at "
                f"excerpt {first_id}; try --dtype float32. The store keeps its last checkpoint."
            )


class _CheckpointWriter:
    """Writes checkpoints in a background thread. The state is first copied to the host (the only
    pause the device sees); compression and disk writes then overlap the next batches. One
    checkpoint at a time; a failed write surfaces at the next checkpoint or at `wait`, with the
    previous checkpoint still committed."""

    def __init__(self, out: Path, n_layers: int, negatives: bool):
        self.out, self.n_layers, self.negatives = out, n_layers, negatives
        self._thread = None
        self._error: OSError | None = None

    def submit(self, generation: int, layers: list, random_ids: np.ndarray, done: int, complete: bool,
               background: bool) -> None:
        self.wait()
        # A periodic checkpoint keeps the one before it for readers (`store.write_checkpoint`);
        # the last one of a run leaves only itself.
        args = (generation, layers, random_ids, done, complete, background)
        if not background:
            self._write(*args)
            self.wait()
            return
        import threading

        self._thread = threading.Thread(target=self._write, args=args, name="checkpoint", daemon=True)
        self._thread.start()

    def _write(self, generation, layers, random_ids, done, complete, keep_previous) -> None:
        try:
            st.write_checkpoint(self.out, generation, layers, random_ids, done, complete, self.n_layers,
                                self.negatives, keep_previous=keep_previous)
        except OSError as exc:
            st.discard_uncommitted(self.out)
            self._error = exc

    def drain(self) -> None:
        """Let a background write finish (on the way out after another error), raising nothing."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise UserError(
                f"cannot write a checkpoint to '{self.out}': {exc.strerror or exc}; the store still holds "
                "its previous checkpoint, free space and run the same command to resume"
            )


def _layer_host(state: ref.LayerState, sample: ref.RandomSample) -> dict[str, np.ndarray]:
    """The state's arrays as stored: per-token activations in rank order, no slot maps."""
    out = {}
    for f in dataclasses.fields(state):
        v = sample.ordered(state.random_acts) if f.name == "random_acts" else state.ordered(f.name)
        if isinstance(v, torch.Tensor) and f.name not in ref.SLOT_FIELDS:
            out[f.name] = _host(v)
    return out


def _layer_from_host(arrays: dict, count: int, ready: bool, spec, n, act_dtype, device) -> ref.LayerState:
    state = ref.LayerState.empty(spec, n, act_dtype, device)  # every slot map in rank order
    for f in dataclasses.fields(state):
        cur = getattr(state, f.name)
        if isinstance(cur, torch.Tensor) and f.name not in ref.SLOT_FIELDS:
            setattr(state, f.name, torch.from_numpy(np.ascontiguousarray(arrays[f.name])).to(device=device, dtype=cur.dtype))
    state.count = count
    state.bounds_ready = ready
    return state


def make_hooks(lm: LoadedModel, on_layer) -> list:
    """Register a hook per layer calling on_layer(layer_index, acts[B, T, N]).

    Some models (OPT) flatten the tokens of a batch before their MLP; a pre-hook on the base model
    notes the batch's shape so that such [B * T, N] activations are viewed as [B, T, N]."""
    shape: list[int] = []

    def note_shape(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            shape[:] = ids.shape[:2]

    def deliver(i: int, acts: torch.Tensor) -> None:
        if acts.dim() == 2:
            acts = acts.view(shape[0], shape[1], acts.shape[-1])
        on_layer(i, acts)

    handles = [lm.model.base_model.register_forward_pre_hook(note_shape, with_kwargs=True)]
    for i, module in enumerate(lm.modules):
        if lm.arch.read == "output":
            def hook(mod, args, output, i=i):
                deliver(i, output)
            handles.append(module.register_forward_hook(hook))
        else:
            def pre(mod, args, i=i):
                deliver(i, args[0])
            handles.append(module.register_forward_pre_hook(pre))
    return handles


class SideStream:
    """The per-layer updates on a second CUDA stream, so that the kernels that reduce layer i run
    while the main stream goes on with the rest of the forward pass (layer i's output projection,
    layer i + 1's attention and matrix products): the issue's "hide a separate pass behind the
    next layer's matrix products".

    Ordering: each update waits for everything queued on the main stream before it (the
    activation, the batch's sample plan, earlier checkpoints' reads of the state); `join` makes the
    main stream wait for every update before the flags, the state or the next batch's plan are
    touched. All updates share this one stream, so the state and the kernels' scratch (per stream,
    `triton_update._scratch`) see them in order. The activation tensor is freed by the model while
    its update may still be queued: `record_stream` keeps the allocator from handing its memory to
    the main stream before the update has read it. Not under torch.compile: inductor reuses a
    graph's buffers itself, without the allocator, so nothing could hold the activation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def run(self, acts: torch.Tensor, fn):
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn()
        acts.record_stream(self.stream)
        return out

    def join(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def side_stream_problem(device: torch.device, backend: str, compiled: bool, fused: bool) -> str | None:
    """Why --side-stream cannot run with these settings (one line), or None."""
    if device.type != "cuda":
        return f"needs a CUDA device, not '{device}'"
    if backend != "triton":
        return "needs the triton backend"
    if compiled:
        return ("runs the updates beside an eager forward pass: under --compile inductor reuses the "
                "activations' memory inside the graph")
    if fused:
        return "has nothing to overlap with --fuse-activation (the activation step is the kernel)"
    return None


@dataclass
class Updates:
    """The update functions of one recording loop (`select_updates`)."""

    backend: str
    """"torch" or "triton" (auto resolved)."""
    eager: object
    """update_layer(state, spec, acts, batch) -> flag, for batches run eagerly."""
    graph: object | None
    """The same inside a compiled graph (None without --compile)."""
    graph_counts: bool
    """Whether `graph` leaves state.count to the caller (the Triton op does; the reference, run
    outside the graph, counts itself)."""


def select_updates(backend: str, device: torch.device, compiled: bool) -> Updates:
    """Resolve `backend` on `device` and pick its update functions, eager and in-graph."""
    from kernels import resolve_backend, select_update

    try:
        backend = resolve_backend(backend, device)
        eager = select_update(backend, device)
        # In a compiled graph the update must not touch host integers; the reference does, so
        # it runs outside the graph (a break per layer) and keeps its own token count.
        graph = select_update(backend, device, in_graph=True) if compiled else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    counts = graph is not None
    if compiled and graph is None:
        graph = torch.compiler.disable(eager)
    return Updates(backend, eager, graph, counts)


def attach(lm: LoadedModel, states: list, spec: ref.ReductionSpec, updates: Updates, current: dict,
           flags: list, skip: int = 0, fused_plan: list | None = None, side: SideStream | None = None):
    """Connect each layer of `lm` to its state for a recording loop; returns the function that
    disconnects them. Each forward pass then appends one non-finite flag per layer to `flags`,
    running the in-graph update while `current["graph"]` is set, on `current["batch"]`.

    Plain: a hook per layer folds the neuron vector (its first `skip` tokens dropped) into the
    state. With `fused_plan` (`engine.fuse.plan_fusion`, triton backend): each layer's activation
    step is replaced by the kernel that computes the activations and folds them in one read.
    With `side`, the plain path's eager updates run on that stream; the caller joins it after
    each forward pass."""

    def check(i: int, t: torch.Tensor, what: str) -> None:
        if t.dim() != 3 or t.shape[-1] != lm.n_neurons[i]:
            raise UserError(
                f"layer {i}: {what} gave a tensor of shape {tuple(t.shape)}, expected "
                f"[batch, tokens, {lm.n_neurons[i]}]: this variant of '{lm.identity['model_type']}' "
                "is not supported"
            )

    if fused_plan is not None:
        from engine import fuse
        from kernels import triton_update

        def on_pre(i: int, pre: torch.Tensor, up, activation: str) -> torch.Tensor:
            check(i, pre, "the activation step")
            fn = triton_update.activate_update_in_graph if current.get("graph") else triton_update.activate_update
            y, flag = fn(states[i], spec, pre, up, activation, current["batch"], skip=skip)
            flags.append(flag)
            return y

        undo = fuse.install(fused_plan, on_pre)
        return lambda: fuse.uninstall(undo)

    def on_layer(i: int, acts: torch.Tensor) -> None:
        check(i, acts, f"the hooked module '{lm.arch.module}'")
        view = acts[:, skip:, :] if skip else acts
        if current.get("graph"):
            flags.append(updates.graph(states[i], spec, view, current["batch"]))
        elif side is not None:
            flags.append(side.run(acts, lambda: updates.eager(states[i], spec, view, current["batch"])))
        else:
            flags.append(updates.eager(states[i], spec, view, current["batch"]))

    hook = on_layer
    if updates.graph is not None and not updates.graph_counts:
        # The reference runs outside a compiled graph. With the whole hook outside it too, the
        # graph breaks at the hook call: traced, the code after the break inside the hook was
        # guarded on the layer (len(flags)) and recompiled once per layer until dynamo's limit of
        # 8, warning, on any model deeper than that.
        hook = torch.compiler.disable(on_layer)
    handles = make_hooks(lm, hook)

    def detach() -> None:
        for h in handles:
            h.remove()
    return detach


_OOM_HINT = " (out of device memory: lower --batch-size)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _trial_forward(lm: LoadedModel, name: str, tokens: np.ndarray, bos_id: int | None, device: torch.device) -> None:
    """One excerpt through the model before the store is created or resumed: a model that loads but
    cannot run (a config its own code rejects at run time) stops with one line, and no store is
    left behind for it."""
    toks = np.asarray(tokens, dtype=np.int64)
    if bos_id is not None:
        toks = np.concatenate([np.full((toks.shape[0], 1), bos_id, dtype=np.int64), toks], axis=1)
    try:
        with torch.inference_mode():
            lm.model.base_model(input_ids=ref.to_device(toks, device), use_cache=False)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise UserError(f"the model '{name}' loads but its forward pass fails: {_first_line(exc)}"
                        f"{_OOM_HINT if _is_oom(exc) else ''}") from None


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_OPTION_RULES = {
    "excerpt_len": (lambda v: v >= 1, "--excerpt-len must be at least 1"),
    "batch_size": (lambda v: v >= 1, "--batch-size must be at least 1"),
    "top_k": (lambda v: v >= 1, "--top-k must be at least 1"),
    "random_k": (lambda v: v >= 0, "--random-k must be at least 0"),
    "quantile_k": (lambda v: v >= 0, "--quantile-k must be at least 0"),
    "quantile_prefix": (lambda v: v >= 1, "--quantile-prefix must be at least 1 excerpt"),
    "max_excerpts": (lambda v: v is None or v >= 1, "--max-excerpts must be at least 1"),
    "hist_bins": (lambda v: v >= 1, "--hist-bins must be at least 1"),
    "checkpoint_every": (lambda v: v >= 0, "--checkpoint-every must be a number of seconds, at least 0"),  # NaN fails
    "seed": (lambda v: 0 <= v < 2**63, "--seed must be an integer from 0 to 2^63 - 1"),
}
"""The rule of each recording option and the line that refuses a value breaking it (record and bench)."""


def check_options(**values) -> None:
    """Refuse (UserError, one line) the first of the recording options given by name whose value
    breaks its rule in `_OPTION_RULES`. Nothing is loaded or written before this."""
    for name, value in values.items():
        ok, message = _OPTION_RULES[name]
        if not ok(value):
            raise UserError(message)


def check_context(excerpt_len: int, bos: bool, context: int | None) -> None:
    """Refuse excerpts (plus a BOS token) longer than the model's context of `context` positions."""
    if context is not None and excerpt_len + int(bos) > context:
        raise UserError(f"--excerpt-len {excerpt_len}{' plus the BOS token' if bos else ''} is longer than the "
                        f"model's context of {context} positions; use at most {context - int(bos)}")


def record(cfg: RecordConfig, log=print) -> Summary:
    """Record `cfg.model` over `cfg.corpus` into the store `cfg.out` (resuming if it holds this run)."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    check_options(excerpt_len=cfg.excerpt_len, batch_size=cfg.batch_size, top_k=cfg.top_k, random_k=cfg.random_k,
                  quantile_k=cfg.quantile_k, quantile_prefix=cfg.quantile_prefix, max_excerpts=cfg.max_excerpts,
                  hist_bins=cfg.hist_bins, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed)
    exists = _prepare_out(out)
    device = resolve_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)
    updates = select_updates(cfg.backend, device, cfg.compile)
    if cfg.fuse_activation and updates.backend != "triton":
        raise UserError("--fuse-activation needs the triton backend (--backend triton, or auto on a "
                        "CUDA GPU whose kernels pass the self-check)")
    if cfg.side_stream:
        why = side_stream_problem(device, updates.backend, cfg.compile, cfg.fuse_activation)
        if why:
            raise UserError(f"--side-stream {why}")

    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    corpus = load_corpus(cfg.corpus, tokenizer, cfg.excerpt_len, cfg.max_excerpts, cfg.text_field)
    bos = use_bos(cfg.bos, tokenizer)
    lm = load_model(cfg.model, device, dtype, cfg.revision, tokenizer=tokenizer)
    # Checked before the store exists, so that the corrected command is not refused as another run.
    check_context(cfg.excerpt_len, bos, lm.identity["context"])
    top_id = max(int(corpus.tokens.max()) if corpus.tokens.size else 0,
                 tokenizer.bos_token_id if bos and tokenizer.bos_token_id is not None else 0)
    if top_id >= lm.identity["vocab_embedded"]:
        raise UserError(f"the tokenizer of '{cfg.model}' gives token id {top_id} but the model embeds only "
                        f"{lm.identity['vocab_embedded']:,} tokens: tokenizer and model do not belong together")
    negatives = lm.arch.gated if cfg.negatives is None else cfg.negatives
    spec = ref.ReductionSpec(
        excerpt_len=cfg.excerpt_len, top_k=cfg.top_k, negatives=negatives, random_k=cfg.random_k,
        quantile_k=cfg.quantile_k, quantile_prefix=max(1, min(cfg.quantile_prefix, -(-corpus.n_excerpts // 4))),
        hist_bins=cfg.hist_bins, seed=cfg.seed,
    )
    identity = _identity(cfg, lm, corpus, spec, dtype, bos)
    # The activation dtype is the model's; the state keeps per-token activations in it.
    act_dtype = dtype
    plan = memory_plan(spec, lm.n_neurons, act_dtype, lm.identity["n_parameters"],
                       torch.empty((), dtype=dtype).element_size(), min(cfg.batch_size, corpus.n_excerpts),
                       lm.identity["d_model"])
    avail = available_bytes(device)
    # The model's weights are already in that memory. On the CPU a checkpoint's host snapshot
    # shares it with the state, so the state counts twice there.
    snapshot = plan["state"] if device.type == "cpu" else 0
    log(f"memory: per-neuron state {_fmt_bytes(plan['state'])}, model {_fmt_bytes(plan['model'])}, "
        f"batch {_fmt_bytes(plan['batch'])}" + (f", checkpoint copy of the state {_fmt_bytes(snapshot)}" if snapshot
                                                else "")
        + f" (total {_fmt_bytes(plan['total'] + snapshot)}, {_fmt_bytes(avail)} free on {device})")
    need = plan["total"] - plan["model"] + snapshot
    if need > avail:
        raise UserError(
            f"recording needs about {_fmt_bytes(need)} on {device} beyond the model but {_fmt_bytes(avail)} "
            "is free; lower --batch-size, --top-k, --random-k, --quantile-k or --hist-bins"
        )

    bos_id = tokenizer.bos_token_id if bos else None
    _trial_forward(lm, cfg.model, corpus.tokens[:1], bos_id, device)

    L = len(lm.modules)
    if not exists:
        run = {"identity": identity, "model": lm.identity, "tokenizer": type(tokenizer).__name__,
               "dtype": identity["dtype"], "corpus": corpus.description, "excerpt_len": cfg.excerpt_len,
               "spec": dataclasses.asdict(spec), "bos": bos, "seed": cfg.seed,
               "n_excerpts": corpus.n_excerpts, "n_layers": L, "n_neurons": lm.n_neurons,
               "torch": torch.__version__}
        try:
            st.create_store(out, run, corpus.tokens.shape, vocab_strings(tokenizer))
        except OSError as exc:
            raise UserError(f"cannot create the store at '{out}': {exc.strerror or exc}") from None
    with st.writer_lock(out):
        return _record_locked(cfg, log, out, t_start, lm, corpus, tokenizer, spec, identity, updates, device,
                              dtype, bos, bos_id, L)


def _record_locked(cfg, log, out, t_start, lm, corpus, tokenizer, spec, identity, updates, device, dtype, bos,
                   bos_id, L) -> Summary:
    """The recording proper, while this process holds the store (st.writer_lock)."""
    negatives = spec.negatives
    act_dtype = dtype
    progress = _check_identity(out, identity, lm.identity.get("local_dir"))
    st.check_recorded(out, int(progress["excerpts_done"]))
    st.discard_uncommitted(out)

    start = int(progress["excerpts_done"])
    generation = int(progress.get("generation") or 0)
    # The state is made of inference tensors: a compiled graph's call of the update op then skips
    # the dispatcher's Python version-counter step (0.64 -> 0.09 ms of host time per layer call on
    # a 2-core Xeon, benchmarks/launch_overhead.py). It is only changed in inference mode.
    with torch.inference_mode():
        if progress.get("checkpoint"):
            layers, random_ids = st.read_checkpoint(out, progress["checkpoint"], negatives)
            states = [_layer_from_host(arrays, count, ready, spec, n, act_dtype, device)
                      for (arrays, count, ready), n in zip(layers, lm.n_neurons)]
            sample = ref.RandomSample.from_ids(spec, random_ids, device)
            log(f"resuming {out} at excerpt {start:,} of {corpus.n_excerpts:,}")
        else:
            states = [ref.LayerState.empty(spec, n, act_dtype, device) for n in lm.n_neurons]
            sample = ref.RandomSample.empty(spec, device)

    if progress.get("complete"):
        return Summary(corpus.n_excerpts, corpus.n_excerpts * cfg.excerpt_len, sum(lm.n_neurons), L,
                       0.0, 0.0, _store_bytes(out), start, True)

    total = corpus.n_excerpts
    T = cfg.excerpt_len
    flags: list[torch.Tensor] = []
    current: dict = {}

    writer = _CheckpointWriter(out, L, negatives)

    def checkpoint(done: int, complete: bool, background: bool = False) -> None:
        nonlocal generation
        generation += 1
        snapshot = [(_layer_host(s, sample), s.count, s.bounds_ready) for s in states]
        writer.submit(generation, snapshot, _host(sample.ids), done, complete, background)

    fused_plan = None
    if cfg.fuse_activation:
        from engine import fuse

        fused_plan, why = fuse.plan_fusion(lm)
        if fused_plan is None:
            log(f"--fuse-activation: {why}; recording with a separate pass instead")
        else:
            log(f"activations computed and recorded in one pass: "
                f"{', '.join(sorted({f.activation for f in fused_plan}))} in {L} layers")
    side = SideStream(device) if cfg.side_stream else None
    detach = attach(lm, states, spec, updates, current, flags, skip=1 if bos else 0, fused_plan=fused_plan,
                    side=side)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total * T, initial=start * T, unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc="record", file=sys.stderr, mininterval=1.0)
    last_ckpt = t_loop = time.monotonic()
    done = start
    late_flags = LateFlags(device)
    stopped = False
    base = lm.model.base_model
    compiled = torch.compile(base) if cfg.compile else None
    tokens_root = st._open_root(out, "r+")
    try:
        with _Interrupt() as intr, torch.inference_mode():
            while done < total:
                b = min(cfg.batch_size, total - done)
                batch, new_sample = ref.plan_batch(spec, sample, done, b, device)
                current["batch"] = batch
                toks = corpus.tokens[done : done + b].astype(np.int64)
                if bos:
                    toks = np.concatenate([np.full((b, 1), bos_id, dtype=np.int64), toks], axis=1)
                flags.clear()
                # The batch that completes the quantile prefix (it sets boundaries on the host)
                # and a short last batch (another shape) run eagerly; the rest in the graph.
                use_graph = compiled is not None and b == cfg.batch_size and not batch.completes_prefix
                current["graph"] = use_graph
                try:
                    (compiled if use_graph else base)(input_ids=ref.to_device(toks, device), use_cache=False)
                except (UserError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    raise UserError(f"the forward pass failed on the batch starting at excerpt {done:,}: "
                                    f"{_first_line(exc)}{_OOM_HINT if _is_oom(exc) else ''}; the store keeps "
                                    "its last checkpoint") from None
                if side is not None:
                    side.join()
                if use_graph and updates.graph_counts:
                    for s in states:
                        s.count += b * T
                sample = new_sample
                if len(flags) != L:
                    raise UserError(
                        f"the forward pass reached {len(flags)} of {L} hooked '{lm.arch.module}' "
                        f"modules: this variant of '{lm.identity['model_type']}' bypasses them and "
                        "is not supported"
                    )
                late_flags.push(torch.stack(flags), done)
                try:
                    st.write_tokens(tokens_root, done, corpus.tokens[done : done + b])
                except OSError as exc:
                    raise UserError(f"cannot write the tokens of excerpts {done:,}.. to '{out}': "
                                    f"{exc.strerror or exc}; the store still holds its last checkpoint, free "
                                    "space and run the same command to resume") from None
                done += b
                if bar is not None:
                    bar.update(b * T)
                if intr.requested:
                    stopped = True
                    break
                if time.monotonic() - last_ckpt >= cfg.checkpoint_every and done < total:
                    late_flags.flush()
                    checkpoint(done, complete=False, background=True)
                    last_ckpt = time.monotonic()
            late_flags.flush()
            if not stopped:
                for s in states:
                    ref.finish_layer(s, spec, done)
            checkpoint(done, complete=not stopped)
    finally:
        writer.drain()
        detach()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    n_tok = (done - start) * T
    loop_s = time.monotonic() - t_loop
    summary = Summary(done, done * T, sum(lm.n_neurons), L, seconds, n_tok / loop_s if loop_s else 0.0,
                      _store_bytes(out), start, not stopped)
    if stopped:
        log(f"stopped at excerpt {done:,} of {total:,}; run the same command again to resume")
    return summary
