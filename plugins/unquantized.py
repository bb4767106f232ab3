"""Backend for models that are not quantized at all (plain fp32 / fp16 / bf16 weights)."""

from __future__ import annotations

import torch
from torch import nn

from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    Scheme,
    class_path,
    hf_quantizer,
    module_index,
    quantized_tensor_names,
)

#: No quantization: every weight in the model's float dtype.
NONE = Scheme(
    name="none",
    summary="no quantization (weights in the model's dtype)",
    formula="n x dtype size",
    module_class="Linear",
    weight_bytes=lambda out, inp, f: (out * inp * f, 0),
)


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
        params = (p for m in module_index(model).values() for p in m.parameters(recurse=False))
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        return Detection(evidence=(f"no quantizer on {class_path(model)}; parameter dtypes: {', '.join(dtypes)}",))

    def schemes(self) -> tuple[Scheme, ...]:
        """``none``: plan an unquantized model from its config."""
        return (NONE,)

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        # Anything that is not a plain float tensor is storage we do not understand: protect it.
        odd = quantized_tensor_names(model, list(module_index(model)))
        notes = (f"{len(odd)} non-float or tensor-subclass tensors are left untouched",) if odd else ()
        return Declarations(quantized=odd, default_upcast="none", notes=notes, warnings=_looks_quantized(model))


#: Integer dtypes quantization libraries store weights in (int64 is left out: index buffers such as
#: ``position_ids`` use it).
_PACKED_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32)


def _looks_quantized(model: nn.Module) -> tuple[str, ...]:
    """A warning when modules hold integer matrices (packed weights) that no backend claimed."""
    classes: dict[str, int] = {}
    for mod in module_index(model).values():
        tensors = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if any(t.dtype in _PACKED_DTYPES and t.dim() >= 2 and min(t.shape) > 1 for t in tensors):
            path = class_path(mod)
            classes[path] = classes.get(path, 0) + 1
    if not classes:
        return ()
    found = ", ".join(f"{n} x {c}" for c, n in sorted(classes.items()))
    return (
        f"this model looks quantized ({found} hold integer weight matrices) but no installed backend recognised "
        "it, so it is handled as unquantized: install the plugin for its quantization library (see "
        "`kbitprep backends`), or fix a plugin whose detector matches the wrong class path",
    )
