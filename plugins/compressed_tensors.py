"""Backend for compressed-tensors models (``nn.Linear`` layers carrying a ``quantization_scheme``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    FixUp,
    class_path,
    hf_quantizer,
    module_index,
    quantized_tensor_names,
)

#: The class of the ``quantization_scheme`` compressed-tensors attaches to each quantized layer.
SCHEME_CLASS = "QuantizationScheme"
#: Float quantization parameters (scales) that are storage too: casting them changes the dtype
#: compressed-tensors decompresses the weights to.
_FLOAT_QPARAMS = ("_scale", "_global_scale")


def _layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, mod in module_index(model).items()
        if (scheme := getattr(mod, "quantization_scheme", None)) is not None
        and type(scheme).__name__ == SCHEME_CLASS
        and type(scheme).__module__.startswith("compressed_tensors")
    ]


def quantizer_answer(quantizer: Any, attr: str) -> bool | None:
    """A yes/no attribute of a transformers quantizer, whether it is a property or a method.

    ``CompressedTensorsHfQuantizer.is_qat_trainable`` is a *method*: reading it without calling it
    gives a bound method, which is always truthy. Returns ``None`` when the attribute is absent.
    """
    value = getattr(quantizer, attr, None)
    if value is None:
        return None
    return bool(value() if callable(value) else value)


def _needs_weight_placeholder(model: nn.Module, layers: list[str]) -> list[str]:
    mods = module_index(model)
    return [name for name in layers if not hasattr(mods[name], "weight") and hasattr(mods[name], "weight_packed")]


def _placeholder_fixup(names: list[str]) -> FixUp:
    def apply(model: nn.Module) -> None:
        mods = dict(model.named_modules())
        for name in names:
            mod = mods[name]
            scale = getattr(mod, "weight_scale", None)
            dtype = scale.dtype if isinstance(scale, torch.Tensor) else torch.get_default_dtype()
            # A plain attribute, not a Parameter: compressed-tensors' decompression replaces it with
            # the dense weight Parameter (nn.Module.__setattr__ drops the attribute first).
            mod.weight = torch.empty(0, dtype=dtype, device=mod.weight_packed.device)

    return FixUp(
        name="ct-weight-placeholder",
        description=(
            f"give the {len(names)} packed compressed-tensors layers an empty `weight` attribute (dtype of their "
            "scales) so PEFT's LoRA can wrap them before the first forward, which decompresses them and "
            "replaces it with the dense weight; LoRA initialisations that read the base weight (pissa, olora, "
            "...) need a forward first"
        ),
        apply=apply,
    )


class CompressedTensorsBackend(Backend):
    """compressed-tensors: layers stay ``nn.Linear`` with a ``quantization_scheme`` attribute.

    Packed formats store ``weight_packed`` (int32) + ``weight_scale`` (and no ``weight``); int8 and
    fp8 formats store the quantized ``weight`` itself. Every non-float tensor of those layers and
    their float scales are quantized storage: never cast. On transformers' route the first forward
    decompresses every layer to dense weights *in the dtype of their scales* (a pre-hook of the
    model): PEFT's function casts the scales to fp32 first and so ends up with an fp32 model;
    kbitprep keeps the loaded dtype, and refuses upcast policies, since fp32 norms or embeddings
    would meet the 16-bit decompressed weights.

    Before that first forward, packed layers have no ``weight`` and PEFT's LoRA cannot wrap them
    (``'Linear' object has no attribute 'weight'``): a fix-up gives them an empty placeholder (see
    the fix-up's description). The quantizer decides trainability through ``is_trainable`` (False
    on its FP8-kernel path); ``is_qat_trainable`` is a method and is called, and reported.
    """

    name = "compressed-tensors"
    priority = 100
    requires = ("compressed_tensors",)
    install_hint = "pip install compressed-tensors"
    description = "compressed-tensors layers (nn.Linear + quantization_scheme; packed int4/int8/fp8 storage)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Claim the modules that carry a compressed-tensors ``quantization_scheme``."""
        layers = _layers(model)
        if not layers:
            return None
        mods = module_index(model)
        fmts = {getattr(mods[n].quantization_scheme, "format", None) for n in layers}
        formats = sorted(str(getattr(f, "value", f) or "?") for f in fmts)
        evidence = [f"{len(layers)} modules with a compressed_tensors QuantizationScheme (format {', '.join(formats)})"]
        quantizer = hf_quantizer(model)
        if quantizer is not None:
            evidence.append(f"hf_quantizer: {class_path(quantizer)}")
        return Detection(evidence=tuple(evidence), modules=tuple(layers))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Declare packed weights, zero points and scales storage; fix up packed layers for PEFT."""
        storage = quantized_tensor_names(
            model, detection.modules, include=lambda local, t: local.endswith(_FLOAT_QPARAMS)
        )
        quantizer = hf_quantizer(model)
        notes = ["compressed-tensors decompresses its layers on the first forward, to the dtype of their scales"]
        trainable, reason = True, ""
        if quantizer is not None:
            qat = quantizer_answer(quantizer, "is_qat_trainable")
            if qat is not None:
                notes.append(
                    f"{type(quantizer).__name__}.is_qat_trainable() = {qat}: the quantized weights themselves "
                    f"{'can' if qat else 'cannot'} be trained (QAT); LoRA adapters train either way"
                )
            if quantizer_answer(quantizer, "is_trainable") is False:
                trainable = False
                reason = (
                    f"{type(quantizer).__name__}.is_trainable is False (its FP8-kernel path is inference only); "
                    "load the model with CompressedTensorsConfig(dequantize=True) to fine-tune it"
                )
        packed = _needs_weight_placeholder(model, list(detection.modules))
        fixups = (_placeholder_fixup(packed),) if packed else ()
        return Declarations(
            quantized=storage,
            allow_upcast=False,
            upcast_note=(
                "compressed-tensors decompresses to the dtype of the (never cast) scales: fp32 norms or embeddings "
                "break the forward ('expected m1 and m2 to have the same dtype')"
            ),
            trainable=trainable,
            not_trainable_reason=reason,
            fixups=fixups,
            notes=tuple(notes),
        )
