"""Backend for EETQ models (transformers' ``EetqLinear``: int8 weight + fp16 per-channel scales)."""

from __future__ import annotations

import importlib.util

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, detect_layers, quantized_tensor_names

#: The layer transformers swaps in for ``EetqConfig`` (its kernel comes from the ``kernels`` hub), and
#: the ``eetq`` package's own layer (older transformers, direct use).
EETQ_LAYERS = ("transformers.integrations.eetq.EetqLinear", "eetq.modules.qlinear.EetqLinear")


def _peft_can_wrap_eetq() -> bool:
    # PEFT's LoRA dispatcher handles EetqLinear only when the ``eetq`` package is importable.
    try:
        return importlib.util.find_spec("eetq") is not None
    except (ImportError, ValueError):
        return False


class EetqBackend(Backend):
    """EETQ: an int8 ``weight`` Parameter laid out ``[in, out]`` and fp16 ``weight_scales``.

    ``requires`` is empty on purpose. Preparing an EETQ model needs nothing from an EETQ library:
    the layers are recognised by class path and the declarations are plain data. A model with
    ``EetqLinear`` layers can only exist where its CUDA kernel loaded (transformers fetches it
    through the ``kernels`` package, not the ``eetq`` package), so requiring ``eetq`` would only
    hide real models from the detector. What the ``eetq`` package *is* needed for, PEFT's LoRA
    wrapper for these layers, is reported as a note in the plan.

    ``weight_scales`` (and ``bias``) are created with ``requires_grad=True``; they are frozen like
    everything else, which also keeps EETQ's backward (it computes only the input's gradient) from
    being asked for theirs. Nothing is upcast: the kernel takes fp16 activations only.
    """

    name = "eetq"
    priority = 100
    requires = ()
    install_hint = "pip install eetq  (PEFT's LoRA layer for EetqLinear needs it; the kernel needs CUDA)"
    description = "EETQ EetqLinear (int8 [in, out] weight + fp16 weight_scales)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Claim the ``EetqLinear`` modules (transformers' class, or the ``eetq`` package's)."""
        return detect_layers(model, *EETQ_LAYERS, quant_methods=("eetq",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Declare the int8 weights and their fp16 scales quantized storage."""
        storage = quantized_tensor_names(model, detection.modules, include=lambda local, t: local == "weight_scales")
        notes = ["EETQ weight_scales are created with requires_grad=True: frozen, never cast"]
        if not _peft_can_wrap_eetq():
            notes.append(
                "the `eetq` package is not importable: PEFT's LoRA will not wrap EetqLinear layers "
                "('Target module ... is not supported'); install eetq or target other modules"
            )
        return Declarations(
            quantized=storage,
            allow_upcast=False,
            upcast_note="EETQ's w8_a16_gemm kernel takes fp16 activations: fp32 norms or embeddings would hand it fp32",
            notes=tuple(notes),
        )
