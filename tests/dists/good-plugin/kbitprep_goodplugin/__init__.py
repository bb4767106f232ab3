"""A third-party backend for a (toy but real) int8 weight-only linear layer, ``ScaledInt8Linear``."""

from __future__ import annotations

import torch
from torch import nn

from kbitprep.plugin import Backend, CheckpointMode, Declarations, Detection, find_modules, quantized_tensor_names


class ScaledInt8Linear(nn.Module):
    """int8 weight (a frozen Parameter) and an fp16 per-row scale buffer; computes in the input dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.weight = nn.Parameter((w / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale.to(torch.float16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def quantize(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Swap every nn.Linear (except ``skip``) for ScaledInt8Linear, in place."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                setattr(mod, child_name, ScaledInt8Linear(child))
    return model


class ScaledLinearBackend(Backend):
    """Recognises ScaledInt8Linear layers; non-reentrant checkpointing only (to prove declarations are honoured)."""

    name = "scaled-linear"
    priority = 70
    requires = ("torch",)
    install_hint = "pip install kbitprep-goodplugin"
    description = "toy int8 weight-only linear layers (kbitprep's entry-point test plugin)"

    def detect(self, model: nn.Module) -> Detection | None:
        mods = find_modules(model, "kbitprep_goodplugin.ScaledInt8Linear")
        if not mods:
            return None
        return Detection(evidence=(f"{len(mods)} x kbitprep_goodplugin.ScaledInt8Linear",), modules=tuple(mods))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        quantized = quantized_tensor_names(model, detection.modules, include=lambda n, t: n == "scale")
        return Declarations(
            quantized=quantized,
            default_upcast="norms",
            checkpointing=frozenset({CheckpointMode.NON_REENTRANT}),
            default_checkpointing=CheckpointMode.NON_REENTRANT,
            notes=("toy backend from kbitprep-goodplugin",),
        )


class ImpostorBackend(ScaledLinearBackend):
    """Claims the built-in name 'unquantized'; the registry must set it aside."""

    name = "unquantized"
    priority = 1000
