"""Backend for TorchAO: ``nn.Linear`` layers whose weight is a torchao tensor subclass."""

from __future__ import annotations

from collections import Counter

from torch import nn

from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    hf_quantizer,
    quant_method,
    quantized_tensor_names,
)

#: Weight classes whose matmul kernel has no derivative (``aten::_weight_int4pack_mm*``): LoRA cannot train.
_NO_BACKWARD = {"Int4OpaqueTensor", "Int4TilePackedTo4dTensor"}
#: Weight classes verified to accept fp32 activations, so the other parameters may be upcast.
_MIXED_DTYPE_OK = {"Int8Tensor"}


def _torchao_weights(model: nn.Module) -> dict[str, str]:
    """Module name -> class name of the torchao tensor subclass it holds directly."""
    found = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            cls = type(p.data)
            if cls.__module__.split(".")[0] == "torchao":
                found[name] = cls.__name__
    return found


class TorchAoBackend(Backend):
    """TorchAO weight tensor subclasses (``Int8Tensor``, ``IntxUnpackedToInt8Tensor`` ...).

    They report a float dtype, so they are recognised by class and never cast. Trainability is
    decided from the tensor classes, not from ``hf_quantizer.is_trainable`` (which says False for
    intx weights that do train).
    """

    name = "torchao"
    priority = 100
    requires = ("torchao",)
    install_hint = "pip install torchao"
    description = "TorchAO tensor-subclass weights (Int8Tensor, IntxUnpackedToInt8Tensor, ...)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Modules holding torchao tensor subclasses, or a model loaded with ``TorchAoConfig``."""
        weights = _torchao_weights(model)
        evidence = [f"{n} x {c} weights (they report a float dtype)" for c, n in Counter(weights.values()).items()]
        if quant_method(model) == "torchao":
            evidence.append(f"hf_quantizer: {type(hf_quantizer(model)).__name__}")
        elif not weights:
            return None
        return Detection(evidence=tuple(evidence), modules=tuple(weights))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Subclass weights are quantized storage; untrainable int4 kernels are refused before training."""
        classes = set(_torchao_weights(model).values())
        blocked = sorted(classes & _NO_BACKWARD)
        mixed_ok = classes <= _MIXED_DTYPE_OK
        notes = []
        q = hf_quantizer(model)
        said = getattr(q, "is_trainable", None)
        said = said() if callable(said) else said
        if said is False and not blocked:
            notes.append(
                f"hf_quantizer.is_trainable is False for {', '.join(sorted(classes))}; ignored: LoRA trains on them"
            )
        return Declarations(
            quantized=quantized_tensor_names(model, detection.modules),
            allow_upcast=mixed_ok,
            upcast_note=""
            if mixed_ok
            else (
                f"{', '.join(sorted(classes - _MIXED_DTYPE_OK))} weights need activations in their own dtype: "
                "fp32 norms or embeddings break the forward ('expected m1 and m2 to have the same dtype')"
            ),
            trainable=not blocked,
            not_trainable_reason=(
                f"{', '.join(blocked)} weights use an int4 matmul kernel with no backward "
                "(derivative for aten::_weight_int4pack_mm* is not implemented); quantize with "
                "Int8WeightOnlyConfig or IntxWeightOnlyConfig to train LoRA"
            )
            if blocked
            else "",
            notes=tuple(notes),
        )
