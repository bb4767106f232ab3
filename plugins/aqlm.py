"""Backend for AQLM models (``aqlm.QuantizedLinear``: additive codebook quantization)."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, detect_layers, module_index, quantized_tensor_names

#: AQLM's quantized linear layer (transformers swaps it in for ``AqlmConfig`` checkpoints).
AQLM_LAYER = "aqlm.inference.QuantizedLinear"
_UPCAST_NOTE = (
    "AQLM layers compute in the dtype of their codebooks: fp32 norms or embeddings break the forward "
    "('expected m1 and m2 to have the same dtype')"
)


def view_returning_layers(model: nn.Module, modules: tuple[str, ...]) -> list[str]:
    """The AQLM layers that run aqlm's CPU kernel for 8-bit codebooks (``numba_gemm_lut``).

    That kernel (chosen by aqlm for codebooks on the CPU with 256 entries and ``out_group_size`` 1)
    returns a *view* from its custom autograd Function, and PEFT's AQLM LoRA layer adds the adapter
    output to it in place (``result += output``): autograd forbids that, so the first training
    forward fails. It also accepts only float32 inputs and codebooks.
    """
    by_name = module_index(model)
    found = []
    for name in modules:
        codebooks = by_name[name].codebooks
        if codebooks.device.type == "cpu" and codebooks.shape[1] == 256 and codebooks.shape[2] == 1:
            found.append(name)
    return found


class AqlmBackend(Backend):
    """AQLM: int ``codes`` plus float ``codebooks`` and ``scales``, all Parameters.

    The codebooks and scales reload with ``requires_grad=True``: they are declared quantized
    storage, so they are frozen and never cast (an optimizer built from ``requires_grad`` would
    otherwise train them). 8-bit codebooks on the CPU cannot be trained with PEFT's LoRA (see
    :func:`view_returning_layers`): such models are declared not trainable, with the reason, so
    :func:`kbitprep.prepare` refuses them before anything changes instead of autograd failing in
    the first training step.
    """

    name = "aqlm"
    priority = 100
    requires = ("aqlm",)
    install_hint = "pip install 'aqlm[cpu]'  (or 'aqlm[gpu]')"
    description = "AQLM QuantizedLinear (int codes + float codebooks/scales Parameters)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Claim the ``aqlm.QuantizedLinear`` modules."""
        return detect_layers(model, AQLM_LAYER, quant_methods=("aqlm",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """Declare codes, codebooks and scales quantized storage; refuse 8-bit codebooks on the CPU."""
        storage = quantized_tensor_names(
            model, detection.modules, include=lambda local, t: local in ("codebooks", "scales")
        )
        broken = view_returning_layers(model, detection.modules)
        reason = ""
        if broken:
            reason = (
                f"{len(broken)} AQLM layers (e.g. {broken[0]!r}) have 8-bit codebooks on the CPU: aqlm's CPU kernel "
                "for them returns a view from a custom autograd Function and PEFT's LoRA layer adds to it in place, "
                "which autograd forbids ('... is being modified inplace. This view was created inside a custom "
                "Function ...'); on the CPU, train an AQLM model with 16-bit codebooks (e.g. 1x16) instead"
            )
        return Declarations(
            quantized=storage,
            allow_upcast=False,
            upcast_note=_UPCAST_NOTE,
            trainable=not broken,
            not_trainable_reason=reason,
            notes=(
                "AQLM codebooks and scales are float Parameters that reload with requires_grad=True: frozen, not cast",
            ),
        )
