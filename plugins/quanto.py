"""Backend for optimum-quanto: ``QLinear`` and other quanto ``QModuleMixin`` layers."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, detect_layers, quantized_tensor_names


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
