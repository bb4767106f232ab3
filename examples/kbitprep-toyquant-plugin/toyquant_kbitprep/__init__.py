"""kbitprep backend for toyquant: ToyInt8Linear layers, their LoRA layer, and the "toyquant-int8" scheme."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from kbitprep.plugin import Backend, Declarations, Detection, Scheme, detect_layers, quantized_tensor_names
from torch import nn

__all__ = ["ToyQuantBackend"]


def _lora_layers() -> Mapping[type[nn.Module], type[nn.Module]]:
    """PEFT's custom-module mapping; imports PEFT, so kbitprep calls it only to build a LoRA config."""
    import toyquant

    from .lora import ToyInt8LoraLinear

    return {toyquant.ToyInt8Linear: ToyInt8LoraLinear}


def _quantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import toyquant

    return toyquant.quantize(model, skip=("lm_head",))


def _int8_bytes(out: int, inp: int, float_bytes: int) -> tuple[int, int]:
    return out * inp, out * float_bytes  # int8 qweight; one scale per row in the model's dtype


class ToyQuantBackend(Backend):
    """toyquant: int8 weights and per-row scales, both in buffers of ``ToyInt8Linear`` layers."""

    name = "toyquant"
    priority = 100  # a specific library, like the built-ins for bitsandbytes or HQQ
    requires = ("toyquant",)
    install_hint = "pip install kbitprep-toyquant-plugin"
    description = "toyquant ToyInt8Linear (int8 qweight + per-row scale buffers)"

    def detect(self, model: nn.Module) -> Detection | None:
        """The model's ``ToyInt8Linear`` layers (matched by the re-exported path, without importing toyquant)."""
        return detect_layers(model, "toyquant.ToyInt8Linear")

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Both buffers are quantized storage (the float scale too); PEFT gets the LoRA layer for the class."""
        return Declarations(
            quantized=quantized_tensor_names(model, detection.modules, include=lambda name, t: name == "scale"),
            lora_layers=_lora_layers,
        )

    def schemes(self) -> tuple[Scheme, ...]:
        """``--quantization toyquant-int8``: every ``nn.Linear`` but ``lm_head`` becomes a ``ToyInt8Linear``."""
        return (
            Scheme(
                name="toyquant-int8",
                summary="toyquant int8 weights, symmetric, one scale per output row",
                formula="n int8 + one scale per row in the model's dtype",
                module_class="ToyInt8Linear",
                weight_bytes=_int8_bytes,
                param_name="qweight",
                storage_dtype=torch.int8,
                requires=("toyquant",),
                install_hint=self.install_hint,
                quantize=_quantize,
            ),
        )
