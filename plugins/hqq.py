"""Backend for HQQ: ``hqq.core.quantize.HQQLinear`` layers (from hqq's own quantizer or swapped in by hand)."""

from __future__ import annotations

import contextlib
import io
import math

import torch
from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, Scheme, detect_layers, quantized_tensor_names


def _hqq4_bytes(out: int, inp: int, f: int) -> tuple[int, int]:
    n = out * inp
    return math.ceil(n / 2), math.ceil(n / 64) * 2 * f  # packed pairs + scale and zero per 64-group


def _quantize_hqq4(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """hqq's own quantizer (transformers 5 cannot load ``HqqConfig``), 4-bit, group size 64."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    compute = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), dtype)
    with contextlib.redirect_stderr(io.StringIO()):  # hqq draws its own progress bars
        AutoHQQHFModel.quantize_model(
            model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=compute, device="cpu"
        )
    return model


SCHEMES = (
    Scheme(
        name="hqq-4bit",
        summary="hqq 4-bit, group size 64, compute in the model's dtype",
        formula="n/2 packed + scale and zero per 64-group",
        module_class="HQQLinear",
        weight_bytes=_hqq4_bytes,
        param_name="W_q",
        storage_dtype=torch.uint8,
        requires=("hqq",),
        install_hint="pip install hqq",
        allow_upcast=False,
        model_flags={"hqq_quantized": True},
        quantize=_quantize_hqq4,
        frozen_on_load=True,
    ),
)


class HqqBackend(Backend):
    """HQQ: ``W_q`` uint8 Parameters, scale and zero in each layer's ``.meta`` dict (left alone).

    Recognised by the ``HQQLinear`` class, so layers swapped in by hand (no ``hqq_quantized``
    flag) count too. HQQ computes in its ``compute_dtype``: upcasting the other parameters
    breaks the forward, so no upcast policy is allowed.
    """

    name = "hqq"
    priority = 100
    requires = ("hqq",)
    install_hint = "pip install hqq"
    description = "HQQ (HQQLinear, W_q uint8 with scale/zero in .meta)"

    def detect(self, model: nn.Module) -> Detection | None:
        """``HQQLinear`` modules, or a model flagged ``hqq_quantized`` / loaded with an HQQ quantizer."""
        found = detect_layers(
            model, "hqq.core.quantize.HQQLinear", quant_methods=("hqq",), flags=("hqq_quantized",),
            claim_without_layers=True,
        )  # fmt: skip
        if found is not None and found.modules and "hqq_quantized=True" not in found.evidence:
            return Detection((*found.evidence, "no hqq_quantized flag (layers swapped in by hand)"), found.modules)
        return found

    def schemes(self) -> tuple[Scheme, ...]:
        """hqq 4-bit through hqq's own quantizer."""
        return SCHEMES

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Every tensor of an ``HQQLinear`` is quantized storage; upcasting is not allowed."""
        return Declarations(
            quantized=quantized_tensor_names(model, detection.modules, include=lambda name, t: True),
            allow_upcast=False,
            upcast_note=(
                "HQQLinear dequantizes to its compute_dtype: fp32 norms or embeddings break the forward "
                "('expected m1 and m2 to have the same dtype')"
            ),
        )
