"""Upcast policies and checkpointing choices: user options turned into decisions."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import InvalidPolicyError
from .plugin import CheckpointMode, Declarations

__all__ = [
    "UPCAST_POLICIES",
    "UpcastPolicy",
    "checkpoint_keywords",
    "is_norm_module",
    "resolve_checkpointing",
    "resolve_upcast",
    "validate_checkpointing_kwargs",
]

#: A user upcast choice: a policy name, or ``fn(name, parameter, owning_module) -> bool``.
UpcastPolicy = str | Callable[[str, torch.Tensor, nn.Module], bool] | None
#: The named upcast policies.
UPCAST_POLICIES: dict[str, str] = {
    "none": "keep every frozen parameter in its loaded dtype (kbitprep's default where the backend allows)",
    "norms": (
        "cast the fp16/bf16 parameters of normalisation layers to fp32 (the original QLoRA recipe; "
        "train under bf16/fp16 autocast, since an fp32 norm output meets half-precision layers)"
    ),
    "all": "cast every fp16/bf16 non-quantized parameter to fp32 (PEFT's prepare_model_for_kbit_training)",
}

_CHECKPOINT_CHOICES = ("True", "False", "'on'", *[repr(m.value) for m in CheckpointMode])


@functools.cache
def checkpoint_keywords() -> frozenset[str]:
    """The keyword arguments ``torch.utils.checkpoint.checkpoint`` accepts (this torch version)."""
    import inspect
    import re

    from torch.utils import checkpoint as ckpt

    sig = inspect.signature(ckpt.checkpoint)
    names = {p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    try:  # keywords it pops from **kwargs (preserve_rng_state)
        names.update(re.findall(r"kwargs\.pop\(\"(\w+)\"", inspect.getsource(ckpt.checkpoint)))
    except (OSError, TypeError):
        names.add("preserve_rng_state")
    return frozenset(names)


def validate_checkpointing_kwargs(kwargs: object) -> dict[str, object]:
    """Check ``checkpointing_kwargs`` against ``torch.utils.checkpoint.checkpoint`` and return a copy.

    Raises:
        InvalidPolicyError: not a mapping, or a keyword ``checkpoint`` does not take.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise InvalidPolicyError(
            f"checkpointing_kwargs must be a dict of keyword arguments for torch.utils.checkpoint.checkpoint "
            f"(e.g. {{'preserve_rng_state': False}}), got {type(kwargs).__name__} {kwargs!r}"
        )
    valid = checkpoint_keywords()
    bad = sorted(str(k) for k in kwargs if k not in valid)
    if bad:
        raise InvalidPolicyError(
            f"checkpointing_kwargs has keyword(s) torch.utils.checkpoint.checkpoint does not take: {', '.join(bad)}; "
            f"valid keywords: {', '.join(sorted(valid))}"
        )
    return dict(kwargs)


def is_norm_module(module: nn.Module) -> bool:
    """Whether a module is a normalisation layer (LayerNorm, RMSNorm, LlamaRMSNorm, GroupNorm ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def resolve_upcast(
    upcast: UpcastPolicy, decl: Declarations
) -> tuple[str, Callable[[str, torch.Tensor, nn.Module], bool]]:
    """Turn the user's ``upcast=`` value and the backend's declarations into (label, predicate).

    The predicate only chooses among parameters the core already found eligible (plain fp16/bf16,
    not quantized storage).

    Raises:
        InvalidPolicyError: unknown policy name, or an upcast the backend forbids.
    """
    if upcast is None:
        upcast = decl.default_upcast
    if callable(upcast):
        if not decl.allow_upcast:
            raise InvalidPolicyError(
                f"this backend does not allow upcasting ({decl.upcast_note or 'it breaks the forward'}); "
                "use upcast='none'"
            )
        fn = upcast
        label = getattr(fn, "__name__", "custom")
        return f"custom:{label}", lambda n, p, m: bool(fn(n, p, m))
    if not isinstance(upcast, str) or upcast not in UPCAST_POLICIES:
        raise InvalidPolicyError(
            f"upcast={upcast!r} is not a valid policy; valid choices: "
            + ", ".join(repr(k) for k in UPCAST_POLICIES)
            + ", or a callable fn(name, parameter, module) -> bool"
        )
    if upcast != "none" and not decl.allow_upcast:
        raise InvalidPolicyError(
            f"upcast={upcast!r} is not allowed for this backend: {decl.upcast_note or 'upcasting breaks its forward'}; "
            "use upcast='none'"
        )
    if upcast == "none":
        return "none", lambda n, p, m: False
    if upcast == "norms":
        return "norms", lambda n, p, m: is_norm_module(m)
    return "all", lambda n, p, m: True


def resolve_checkpointing(
    checkpointing: bool | str | CheckpointMode | None, decl: Declarations
) -> tuple[CheckpointMode, str]:
    """Turn the user's ``checkpointing=`` value into a mode, with a note on how it was chosen.

    ``True``/``None``/``"on"`` take the backend's default; ``False`` or ``"off"`` disable it; a mode name
    asks for that mode, which the backend must support.

    Raises:
        InvalidPolicyError: an unknown value, or a mode the backend does not support.
    """
    if checkpointing is None or checkpointing is True or checkpointing == "on":
        if not decl.checkpointing:
            return CheckpointMode.OFF, "the backend does not support checkpointing"
        return decl.default_checkpointing, "backend default"
    if checkpointing is False:
        return CheckpointMode.OFF, "disabled by the caller"
    try:
        mode = CheckpointMode(checkpointing)
    except ValueError:
        raise InvalidPolicyError(
            f"checkpointing={checkpointing!r} is not valid; valid choices: " + ", ".join(_CHECKPOINT_CHOICES)
        ) from None
    if mode is CheckpointMode.OFF:
        return mode, "disabled by the caller"
    if mode not in decl.checkpointing:
        supported = ", ".join(sorted(m.value for m in decl.checkpointing)) or "none"
        raise InvalidPolicyError(
            f"checkpointing={mode.value!r} is not supported by this backend (supported: {supported})"
        )
    return mode, "chosen by the caller"
