"""Fallback backend for any transformers quantizer no specific plugin claims (fp8, awq, bitnet, ...)."""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from typing import Any

from torch import nn

from kbitprep.errors import KbitprepWarning
from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    class_path,
    hf_quantizer,
    module_index,
    quant_method,
    quantized_tensor_names,
)

_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _ask(quantizer: Any, attr: str) -> bool | None:
    """The quantizer's answer to ``attr`` (a property, or a method that is called), or None if it has none."""
    try:
        value = getattr(quantizer, attr, None)
        value = value() if callable(value) else value
    except Exception:  # a quantizer's property may fail on an unusual config: treat it as no answer
        return None
    return None if value is None else bool(value)


def _swapped_in(model: nn.Module) -> list[str]:
    """Modules transformers' quantizers swap in (classes from ``transformers.integrations``)."""
    return [n for n, m in module_index(model).items() if type(m).__module__.startswith("transformers.integrations.")]


class HfQuantizerFallbackBackend(Backend):
    """Any model carrying a transformers ``hf_quantizer`` that no specific backend claims.

    Trainability comes from the quantizer (``is_trainable`` / ``is_qat_trainable``, as a property
    or a method); nothing is upcast (kbitprep cannot know what the method tolerates); one
    :class:`~kbitprep.errors.KbitprepWarning` per model names the method.
    """

    name = "hf-quantizer"
    priority = 10
    description = "any other transformers quantizer (trainability from hf_quantizer, no upcast)"

    def detect(self, model: nn.Module) -> Detection | None:
        """Claims the whole model when it carries an ``hf_quantizer`` (specific backends win over it)."""
        q = hf_quantizer(model)
        if q is None:
            return None
        mods = module_index(model)
        evidence = [f"hf_quantizer: {type(q).__name__} (quant_method {quant_method(model)!r})"]
        evidence += [f"{n} x {c}" for c, n in Counter(class_path(mods[m]) for m in _swapped_in(model)).items()]
        return Detection(evidence=tuple(evidence))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        """No upcast; the quantizer's layers are left alone; untrainable when the quantizer says so."""
        q = hf_quantizer(model)
        method = quant_method(model) or "unknown"
        answers = {a: _ask(q, a) for a in ("is_trainable", "is_qat_trainable")}
        known = [v for v in answers.values() if v is not None]
        trainable = any(known) or not known
        said = ", ".join(f"{a}={v}" for a, v in answers.items())
        if model not in _warned:
            _warned.add(model)
            warnings.warn(
                f"kbitprep: no backend plugin knows the {method!r} quantization ({type(q).__name__}); "
                f"preparing it generically: base frozen, nothing upcast, trainability from the quantizer ({said})",
                KbitprepWarning,
                stacklevel=2,
            )
        swapped = _swapped_in(model)
        return Declarations(
            quantized=quantized_tensor_names(model, list(module_index(model)))
            | quantized_tensor_names(model, swapped, include=lambda name, t: True),
            allow_upcast=False,
            upcast_note=f"kbitprep does not know which dtypes {method!r} layers accept",
            trainable=trainable,
            not_trainable_reason=""
            if trainable
            else (
                f"{type(q).__name__} says {said}: transformers does not support training through {method!r} "
                "layers as loaded (load a trainable variant, e.g. dequantized, or use another method)"
            ),
            notes=() if known else (f"{type(q).__name__} does not say whether it is trainable; assumed it is",),
        )
