"""Backend for GPTQ models quantized or loaded through gptqmodel (transformers' GPTQ route)."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, class_path, detect_layers, quantized_tensor_names

#: gptqmodel's base class of every GPTQ kernel (TorchLinear, TorchAtenLinear, Marlin, ...). AWQ layers,
#: which gptqmodel also provides, derive from ``AWQuantLinear`` instead and are not claimed.
GPTQ_LAYER = "gptqmodel.nn_modules.qlinear.GPTQQuantLinear"


class GptqBackend(Backend):
    """GPTQ: the weights live in int32 *buffers* (``qweight``, ``qzeros``, ``g_idx``) and fp16 ``scales``.

    A GPTQ layer has no quantized Parameter at all, so parameter dtypes reveal nothing: layers are
    found by class. Every buffer of those layers is declared quantized storage (the fp16 scales
    included), so nothing ever casts them. The default keeps every other parameter in its loaded
    dtype, as PEFT's function does for GPTQ.
    """

    name = "gptq"
    priority = 100
    requires = ("gptqmodel",)
    install_hint = "pip install gptqmodel"
    description = "GPTQ layers of gptqmodel (int32 qweight/qzeros/g_idx buffers + fp16 scales)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Claim the modules that are gptqmodel GPTQ layers."""
        return detect_layers(
            model,
            GPTQ_LAYER,
            describe=lambda m: f"{class_path(m)} (a {GPTQ_LAYER.rsplit('.', 1)[-1]})",
            quant_methods=("gptq",),
        )

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Declare every buffer of the GPTQ layers (packed ints and fp16 scales) as quantized storage."""
        storage = quantized_tensor_names(model, detection.modules, include=lambda local, t: local == "scales")
        return Declarations(
            quantized=storage,
            default_upcast="none",
            notes=("GPTQ weights are int32 buffers plus fp16 scales; the layers have no quantized Parameter",),
        )
