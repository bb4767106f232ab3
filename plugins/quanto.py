"""Backend for optimum-quanto: ``QLinear`` and other quanto ``QModuleMixin`` layers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, Scheme, detect_layers, quantized_tensor_names


def _int8_bytes(out: int, inp: int, f: int) -> tuple[int, int]:
    return out * inp, f * out  # int8 values + a row scale in the model's dtype


def _int4_bytes(out: int, inp: int, f: int) -> tuple[int, int]:
    groups = out * math.ceil(inp / 128)
    return math.ceil(out * inp / 2), groups * 2 * f  # packed pairs + scale and shift per 128-group


def _scheme(weights: str, summary: str, formula: str, weight_bytes: Any) -> Scheme:
    """One quanto weight type, loaded through transformers' ``QuantoConfig(weights=...)``."""

    def config(dtype: torch.dtype) -> Any:
        from transformers import QuantoConfig

        return QuantoConfig(weights=weights)

    return Scheme(
        name=f"quanto-{weights}",
        summary=summary,
        formula=formula,
        module_class="QLinear",
        weight_bytes=weight_bytes,
        requires=("optimum.quanto",),
        install_hint="pip install optimum-quanto",
        allow_upcast=False,
        quant_method="quanto",
        quantization_config=config,
        cast_raises=True,  # quanto weights refuse a dtype change: PEFT's cast crashes
    )


SCHEMES = (
    _scheme("int8", "optimum-quanto int8 weights", "n int8 + scale per row", _int8_bytes),
    _scheme(
        "int4", "optimum-quanto int4 weights, group size 128", "n/2 packed + scale and shift per 128-group", _int4_bytes
    ),
)


class QuantoBackend(Backend):
    """optimum-quanto layers: ``WeightQBytesTensor`` / ``WeightQBitsTensor`` weights that report bf16.

    PEFT's function tries to cast them and crashes ("The dtype of a weights Tensor cannot be
    changed"); kbitprep never casts them, nor the other parameters (fp32 activations break the
    attention and the quantized matmuls).
    """

    name = "quanto"
    priority = 100
    requires = ("optimum.quanto",)
    install_hint = "pip install optimum-quanto"
    description = "optimum-quanto (QLinear with WeightQBytesTensor / WeightQBitsTensor)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Modules deriving from quanto's ``QModuleMixin``, or a model loaded with ``QuantoConfig``."""
        return detect_layers(
            model,
            "optimum.quanto.nn.qmodule.QModuleMixin",
            describe=lambda m: f"{type(m).__name__} with {type(getattr(m, 'weight', None)).__name__} weights",
            quant_methods=("quanto",),
            claim_without_layers=True,
        )

    def schemes(self) -> tuple[Scheme, ...]:
        """quanto int8 and int4 weights, loaded through transformers' ``QuantoConfig``."""
        return SCHEMES

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """The weights of quanto layers (quantized, or quantized on the fly) are never touched; no upcast."""
        return Declarations(
            quantized=quantized_tensor_names(model, detection.modules, include=lambda name, t: name == "weight"),
            allow_upcast=False,
            upcast_note=(
                "quanto layers compute in the dtype of their weights: fp32 norms or embeddings break the "
                "forward (dtype mismatch in attention and the quantized matmuls)"
            ),
        )
