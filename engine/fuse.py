"""Recording where the activations are produced (`--fuse-activation`).

The plain path hooks each layer's neuron vector after the model has computed it, so the update
kernel reads the whole activation tensor once more. Here the model's own activation step is
replaced by the Triton kernel that computes it (`kernels.triton_update.activate_update`): it reads
the pre-activations (gate and up for gated MLPs), writes the activations the model goes on with,
and reduces them in the same pass, so recording adds no read of its own.

Which step to replace is found per layer and checked numerically against the model's own
computation before anything is patched:

* an activation module whose output is the neuron vector (GPT-2's `mlp.act`, GPT-NeoX's, ...):
  its output on a test vector must match tanh-GELU or erf-GELU;
* a gated MLP with `gate_proj`, `up_proj`, `down_proj` and `act_fn` (Llama, Mistral, Qwen, Gemma,
  ...): its forward on a test input must equal `down_proj(act(gate_proj(x)) * up_proj(x))`
  bit for bit, with act SiLU or tanh-GELU.

Anything else is not fusable and records through the plain path (the caller says why).

The kernel evaluates the activation function in float32 and rounds once (the gated kinds round
act(gate) before the product, as eager PyTorch does), so the activations the model continues with
can differ from eager PyTorch's by rounding (`tests/kernels/test_activate_parity.py` states the
bound; eager GPT-2 rounds after every op of its tanh-GELU formula).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FusedLayer:
    """How one layer's activation step is replaced."""

    module: torch.nn.Module
    """The activation module (kind "act") or the gated MLP (kind "gated") whose forward is patched."""
    kind: str
    activation: str
    """Name in `kernels.triton_update.ACTIVATIONS`."""


def torch_activation(activation: str, pre: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch computation each kernel activation stands for."""
    if activation == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "silu_mul":
        return F.silu(pre) * up
    if activation == "gelu_tanh_mul":
        return F.gelu(pre, approximate="tanh") * up
    raise ValueError(activation)


def _identify_act(module: torch.nn.Module, device: torch.device) -> str | None:
    t = torch.linspace(-8, 8, 4097, device=device)
    with torch.no_grad():
        try:
            out = module(t)
        except Exception:
            return None
        for name in ("gelu_tanh", "gelu"):
            if out.shape == t.shape and torch.allclose(out, torch_activation(name, t), rtol=1e-5, atol=1e-6):
                return name
    return None


def _identify_gated(mlp: torch.nn.Module, d_model: int, dtype, device) -> str | None:
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 5, d_model), generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            want = mlp(x)
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
        except Exception:
            return None
        for name in ("silu_mul", "gelu_tanh_mul"):
            if torch.equal(mlp.down_proj(torch_activation(name, g, u)), want):
                return name
    return None


def plan_fusion(lm) -> tuple[list[FusedLayer] | None, str]:
    """(one FusedLayer per layer, "") if every layer's activation step can be replaced, else
    (None, why not) in a phrase."""
    param = next(lm.model.parameters())
    device, dtype = param.device, param.dtype
    plan = []
    for i, module in enumerate(lm.modules):
        if lm.arch.read == "output":
            name = _identify_act(module, device)
            if name is None:
                return None, (f"layer {i}'s activation module {type(module).__name__} is neither "
                              "tanh- nor erf-GELU")
            plan.append(FusedLayer(module, "act", name))
        elif lm.arch.gated and lm.arch.module.endswith(".down_proj"):
            block = lm.model.base_model.get_submodule(lm.arch.layers)[i]
            mlp = block.get_submodule(lm.arch.module.rsplit(".", 1)[0])
            name = _identify_gated(mlp, int(lm.identity["d_model"]), dtype, device)
            if name is None:
                return None, (f"layer {i}'s MLP ({type(mlp).__name__}) is not "
                              "down_proj(act(gate_proj(x)) * up_proj(x)) with SiLU or tanh-GELU")
            plan.append(FusedLayer(mlp, "gated", name))
        else:
            return None, f"the {lm.arch.name} family reads the input of {lm.arch.module}, not an activation step"
    return plan, ""


def install(plan: list[FusedLayer], on_pre) -> list:
    """Patch each layer's activation step to return `on_pre(i, pre, up, activation)` (up is None
    for an activation module). Returns the undo callables (`uninstall`)."""
    undo = []
    for i, f in enumerate(plan):
        if f.kind == "act":
            def forward(self, x, i=i, name=f.activation):
                return on_pre(i, x, None, name)
        else:
            def forward(self, x, i=i, name=f.activation):
                return self.down_proj(on_pre(i, self.gate_proj(x), self.up_proj(x), name))
        f.module.forward = types.MethodType(forward, f.module)
        undo.append(lambda m=f.module: m.__dict__.pop("forward", None))
    return undo


def uninstall(undo: list) -> None:
    for u in undo:
        u()
