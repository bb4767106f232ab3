"""A backend whose fix-up changes the model in many ways and then fails halfway."""

from __future__ import annotations

import torch
from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, FixUp, find_modules, quantized_tensor_names

LAYER = "kbitprep_broken_fixup.layers.FaultyQuantLinear"


class RepackFailed(RuntimeError):
    """The error the fix-up raises (a stand-in for a kernel that fails mid-way)."""


def _pre_hook(module: nn.Module, args: tuple[object, ...]) -> None:
    return None


def _repack(model: nn.Module) -> None:
    """Change parameters, buffers, flags, hooks, submodules and the config; then fail as told."""
    layers = [m for _, m in model.named_modules() if type(m).__name__ == "FaultyQuantLinear"]
    fault = "none"
    for layer in layers:
        fault = getattr(layer, "fault", "raise")
        # a new packed layout for the quantized storage (new storage, new shape)
        layer.weight.data = layer.weight.data.t().contiguous()
        # the scale replaced in its container, in another dtype
        layer._buffers["scale"] = layer._buffers["scale"].to(torch.float32)
        # bookkeeping attributes, a kernel workspace submodule, a hook
        layer.packed = True
        layer.workspace = nn.Linear(1, 1)
        layer.register_forward_pre_hook(_pre_hook)
    # float parameters: unfreeze one, cast another
    floats = [p for p in model.parameters() if p.dtype.is_floating_point and type(p.data) is torch.Tensor]
    if floats:
        floats[0].requires_grad_(True)
        floats[-1].data = floats[-1].data.to(torch.float32)
    # model-wide: train mode, checkpointing, the config
    model.train()
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable):
        enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
        config.kbitprep_broken_fixup_packed = True
    model.kbitprep_broken_fixup_ran = True
    if fault == "raise":
        raise RepackFailed("repacking the int8 kernels failed halfway (injected fault)")
    if fault == "interrupt":
        raise KeyboardInterrupt("interrupted while repacking (injected fault)")


class FaultyFixupBackend(Backend):
    """Recognises FaultyQuantLinear layers; declares the int8 weight and the scale as quantized storage."""

    name = "broken-fixup"
    priority = 100
    description = "test backend whose fix-up fails halfway"

    def detect(self, model: nn.Module) -> Detection | None:
        layers = find_modules(model, LAYER)
        if not layers:
            return None
        return Detection(evidence=(f"{len(layers)} x {LAYER}",), modules=tuple(layers))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        quantized = quantized_tensor_names(model, detection.modules, include=lambda name, t: name == "scale")
        return Declarations(
            quantized=quantized,
            fixups=(FixUp("repack", "repack the int8 weights for the CPU kernel", _repack),),
        )
