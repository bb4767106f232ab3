"""Backend for models that are not quantized at all (plain fp32 / fp16 / bf16 weights)."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection, class_path, hf_quantizer, quantized_tensor_names


class UnquantizedBackend(Backend):
    """A plain model: freeze it, keep its dtypes, checkpoint (reentrant, the fastest).

    PEFT's function upcasts a whole unquantized model to fp32 and skips checkpointing; the
    drop-in :func:`kbitprep.prepare_model_for_kbit_training` still does that, this backend does not.
    """

    name = "unquantized"
    priority = 0
    description = "models without quantization (keeps dtypes, enables checkpointing)"

    def detect(self, model: nn.Module) -> Detection | None:
        if getattr(model, "is_quantized", False) or hf_quantizer(model) is not None:
            return None
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        return Detection(evidence=(f"no quantizer on {class_path(model)}; parameter dtypes: {', '.join(dtypes)}",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        # Anything that is not a plain float tensor is storage we do not understand: protect it.
        odd = quantized_tensor_names(model, [name for name, _ in model.named_modules()])
        notes = (f"{len(odd)} non-float or tensor-subclass tensors are left untouched",) if odd else ()
        return Declarations(quantized=odd, default_upcast="none", notes=notes)
