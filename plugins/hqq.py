"""Backend for HQQ: ``hqq.core.quantize.HQQLinear`` layers (from hqq's own quantizer or swapped in by hand)."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, detect_layers, quantized_tensor_names


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
        if found is None and getattr(model, "hqq_quantized", False) is True:
            return Detection(evidence=("hqq_quantized=True",))
        if found is not None and found.modules and getattr(model, "hqq_quantized", False) is not True:
            return Detection((*found.evidence, "no hqq_quantized flag (layers swapped in by hand)"), found.modules)
        return found

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
