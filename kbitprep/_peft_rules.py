"""PEFT's rules, written once: what ``peft.prepare_model_for_kbit_training`` (PEFT 0.21) decides.

The drop-in (:func:`kbitprep.prepare_model_for_kbit_training`), the config planner's PEFT figure
and the comparisons all call :func:`peft_rules`. PEFT recognises backends by a few flags and
``quantization_method`` names, so this is the one core module that names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .plugin import CheckpointMode

__all__ = ["PEFT_NO_UPCAST", "PeftRules", "peft_casts", "peft_rules", "peft_rules_for"]

#: ``quantization_method`` values for which PEFT's function casts nothing (and enables checkpointing).
PEFT_NO_UPCAST = ("gptq", "aqlm", "eetq", "torchao", "hqq")
#: The parameter class PEFT's function never casts (bitsandbytes 4-bit packed weights).
PEFT_NEVER_CASTS = "Params4bit"
#: Model flags that make PEFT's function treat a model as k-bit (bitsandbytes).
PEFT_KBIT_FLAGS = ("is_loaded_in_8bit", "is_loaded_in_4bit")


def peft_casts(param: Any) -> bool:
    """Whether PEFT's upcast loop would cast this parameter: fp16/bf16 and not a ``Params4bit``."""
    import torch

    return param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != PEFT_NEVER_CASTS


@dataclass(frozen=True)
class PeftRules:
    """What PEFT's function does to a model.

    Attributes:
        upcast: ``"all"`` (every fp16/bf16 parameter but ``Params4bit`` to fp32) or ``"none"``.
        checkpointing: the checkpointing mode (``OFF`` when PEFT enables none).
        kwargs: the other checkpoint keyword arguments it passes (``use_reentrant`` removed).
    """

    upcast: str
    checkpointing: CheckpointMode
    kwargs: Mapping[str, Any]

    def plan_kwargs(self) -> dict[str, Any]:
        """These rules as keyword arguments of the core planner (with ``peft_compat=True``)."""
        return {"upcast": self.upcast, "checkpointing": self.checkpointing.value, "checkpointing_kwargs": self.kwargs}


def peft_rules_for(
    method: str | None,
    flags: Mapping[str, Any],
    *,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
) -> PeftRules:
    """PEFT's decisions from a ``quantization_method`` and the model's flags (no model needed)."""
    kbit = any(bool(flags.get(f, False)) for f in PEFT_KBIT_FLAGS)
    listed = method in PEFT_NO_UPCAST or bool(flags.get("hqq_quantized", False))
    kwargs = dict(gradient_checkpointing_kwargs or {})
    mode = CheckpointMode.OFF
    if (kbit or listed) and use_gradient_checkpointing:
        mode = CheckpointMode.REENTRANT if kwargs.get("use_reentrant", True) else CheckpointMode.NON_REENTRANT
    kwargs.pop("use_reentrant", None)
    return PeftRules("none" if listed else "all", mode, kwargs)


def peft_rules(
    model: Any,
    *,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
) -> PeftRules:
    """PEFT's decisions for ``model``, read from its ``quantization_method`` and flags."""
    from .plugin import quant_method

    flags = {f: getattr(model, f, False) for f in (*PEFT_KBIT_FLAGS, "hqq_quantized")}
    return peft_rules_for(
        quant_method(model),
        flags,
        use_gradient_checkpointing=use_gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
