"""Backend for TorchAO: ``nn.Linear`` layers whose weight is a torchao tensor subclass."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    Scheme,
    hf_quantizer,
    module_index,
    quant_method,
    quantized_tensor_names,
)

#: Weight classes whose matmul kernel has no derivative (``aten::_weight_int4pack_mm*``): LoRA cannot train.
_NO_BACKWARD = {"Int4OpaqueTensor", "Int4TilePackedTo4dTensor"}
#: Weight classes verified to accept fp32 activations, so the other parameters may be upcast.
_MIXED_DTYPE_OK = {"Int8Tensor"}


#: Weight classes that quantize activations in every forward whatever their attributes say (their
#: kernels take int8 activations: ``torch.ops.torchao._*_8bit_act_*``).
_ALWAYS_QUANTIZES_ACTIVATIONS = {"IntxOpaqueTensor"}


def _torchao_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> the torchao tensor subclass it holds directly."""
    found = {}
    for name, mod in module_index(model).items():
        for p in mod.parameters(recurse=False):
            cls = type(p.data)
            if cls.__module__.split(".")[0] == "torchao":
                found[name] = p.data
    return found


def activation_quantization(weight: torch.Tensor) -> str:
    """How a torchao weight quantizes the activations inside its forward, or ``""`` for weight-only.

    ``Int8Tensor`` / ``Float8Tensor`` carry ``act_quant_kwargs`` (set by the dynamic- and
    static-activation configs), ``IntxUnpackedToInt8Tensor`` carries ``activation_quantization``
    (``Int8DynamicActivationIntxWeightConfig``); ``IntxOpaqueTensor`` always runs int8-activation kernels.
    The returned text names the config that produces it.
    """
    cls = type(weight).__name__
    kwargs = getattr(weight, "act_quant_kwargs", None)
    if kwargs is not None:
        static = getattr(weight, "act_quant_scale", None) is not None
        kind = "Static" if static else "Dynamic"
        family = "Float8" if cls.startswith("Float8") else "Int8"
        return f"{cls} with act_quant_kwargs, from {family}{kind}Activation{family}WeightConfig"
    mode = getattr(weight, "activation_quantization", None)
    if mode is not None:
        value = getattr(mode, "value", mode)
        return f"{cls} with activation_quantization={value!s}, from Int8DynamicActivationIntxWeightConfig"
    if cls in _ALWAYS_QUANTIZES_ACTIVATIONS:
        return f"{cls} (int8-activation kernels), from Int8DynamicActivationIntxWeightConfig"
    return ""


def _int8_config(dtype: torch.dtype) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _int4_config(dtype: torch.dtype) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    int4 = getattr(torch, "int4")  # noqa: B009 - absent from older torch stubs
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(32)))


def _int4_bytes(out: int, inp: int, f: int) -> tuple[int, int]:
    groups = out * math.ceil(inp / 32)
    return out * inp, groups * (f + 1)  # int4 values unpacked in int8 + scale and int8 zero point per group


#: The weight-only configs that train on a CPU, loaded through transformers' ``TorchAoConfig``.
SCHEMES = (
    Scheme(
        name="torchao-int8",
        summary="torchao Int8WeightOnlyConfig (per-row)",
        formula="n int8 + fp32 scale and int8 zero point per row",
        module_class="Linear",
        weight_bytes=lambda out, inp, f: (out * inp, 4 * out + out),
        requires=("torchao",),
        install_hint="pip install torchao",
        quant_method="torchao",
        quantization_config=_int8_config,
    ),
    Scheme(
        name="torchao-int4",
        summary="torchao IntxWeightOnlyConfig int4, group size 32",
        formula="n int8 (int4 values unpacked) + scale and int8 zero point per 32-group",
        module_class="Linear",
        weight_bytes=_int4_bytes,
        requires=("torchao",),
        install_hint="pip install torchao",
        allow_upcast=False,
        quant_method="torchao",
        quantization_config=_int4_config,
    ),
)


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
        tensors = _torchao_tensors(model)
        weights = {n: type(t).__name__ for n, t in tensors.items()}
        evidence = [f"{n} x {c} weights (they report a float dtype)" for c, n in Counter(weights.values()).items()]
        act = Counter(how for t in tensors.values() if (how := activation_quantization(t)))
        evidence += [f"{n} x activations quantized in the forward: {how}" for how, n in act.items()]
        if quant_method(model) == "torchao":
            evidence.append(f"hf_quantizer: {type(hf_quantizer(model)).__name__}")
        elif not weights:
            return None
        return Detection(evidence=tuple(evidence), modules=tuple(weights))

    def schemes(self) -> tuple[Scheme, ...]:
        """int8 and int4 (intx) weight-only, through ``TorchAoConfig``."""
        return SCHEMES

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Subclass weights are quantized storage; untrainable int4 kernels and weights that quantize
        activations (dynamic/static activation configs) are refused before training."""
        tensors = _torchao_tensors(model)
        classes = {type(t).__name__ for t in tensors.values()}
        blocked = sorted(classes & _NO_BACKWARD)
        act_quant = {n: how for n, t in tensors.items() if (how := activation_quantization(t))}
        mixed_ok = classes <= _MIXED_DTYPE_OK
        notes = []
        q = hf_quantizer(model)
        said = getattr(q, "is_trainable", None)
        said = said() if callable(said) else said
        if said is False and not blocked and not act_quant:
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
            trainable=not blocked and not act_quant,
            not_trainable_reason="; ".join(_refusals(blocked, act_quant)),
            notes=tuple(notes),
        )


def _refusals(blocked: list[str], act_quant: dict[str, str]) -> list[str]:
    """Why training through these torchao weights is impossible (empty when it is possible)."""
    reasons = []
    if blocked:
        reasons.append(
            f"{', '.join(blocked)} weights use an int4 matmul kernel with no backward "
            "(derivative for aten::_weight_int4pack_mm* is not implemented); quantize with "
            "Int8WeightOnlyConfig or IntxWeightOnlyConfig to train LoRA"
        )
    if act_quant:
        first = next(iter(act_quant))
        kinds = ", ".join(sorted(set(act_quant.values())))
        reasons.append(
            f"{len(act_quant)} layer(s) quantize their input activations in the forward ({kinds}; first: "
            f"{first}): the activations are rounded to int8/float8 by ops without autograd, so these layers' "
            "outputs do not require grad and no gradient reaches the layers or adapters before them (with a "
            "quantized output head, backward fails). To train LoRA, quantize with a weight-only config "
            "(Int8WeightOnlyConfig or IntxWeightOnlyConfig: same weight storage, float activations) and keep "
            "activation quantization for inference"
        )
    return reasons
