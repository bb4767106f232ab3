"""FSDP: detect that a model will be sharded, and choose a dtype policy FSDP accepts.

FSDP1 (``FullyShardedDataParallel``) flattens the parameters of each wrapped unit into one tensor,
which must have a single floating-point dtype ("Must flatten tensors with uniform dtype",
"Cannot flatten integer dtype tensors"). PEFT's fp32 upcast of norms, embeddings and lm_head
breaks that, so every other tool skips preparation under FSDP. kbitprep instead prepares with a
policy FSDP accepts: no upcast (every frozen parameter keeps its loaded dtype), non-reentrant
checkpointing where the backend supports it, and a check that the parameters really have one
dtype, including the packed storage a backend declares (:class:`~kbitprep.plugin.ShardedStorage`,
e.g. bitsandbytes 4-bit's ``bnb_4bit_quant_storage``).

FSDP2 (``fully_shard``) shards each parameter separately and accepts mixed dtypes; the same policy
is used for it (no fp32 copies of frozen weights either way), but dtype mismatches only warn.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import FsdpWarning, InvalidPolicyError, UnsupportedModelError
from .plugin import CheckpointMode, Declarations, ShardedStorage, module_index

if TYPE_CHECKING:
    from ._plan_types import ParamPlan

__all__ = [
    "FSDP_ENV_VARIABLES",
    "FsdpSetting",
    "FsdpWarning",
    "check_fsdp_dtypes",
    "detect_fsdp",
    "fsdp_choices",
]

#: accelerate's switch (``accelerate launch`` with an FSDP config sets it to ``"true"``).
ACCELERATE_USE_FSDP = "ACCELERATE_USE_FSDP"
#: The ``FSDP_*`` variables accelerate's FSDP plugin reads; any of them set means an FSDP launch.
FSDP_ENV_VARIABLES: tuple[str, ...] = (
    "FSDP_VERSION",
    "FSDP_SHARDING_STRATEGY",
    "FSDP_RESHARD_AFTER_FORWARD",
    "FSDP_OFFLOAD_PARAMS",
    "FSDP_BACKWARD_PREFETCH",
    "FSDP_FORWARD_PREFETCH",
    "FSDP_AUTO_WRAP_POLICY",
    "FSDP_TRANSFORMER_CLS_TO_WRAP",
    "FSDP_MIN_NUM_PARAMS",
    "FSDP_USE_ORIG_PARAMS",
    "FSDP_SYNC_MODULE_STATES",
    "FSDP_STATE_DICT_TYPE",
    "FSDP_ACTIVATION_CHECKPOINTING",
    "FSDP_CPU_RAM_EFFICIENT_LOADING",
)
_TRUE = ("1", "true", "yes", "on", "y", "t")
_WRAPPED_CLASSES = ("FullyShardedDataParallel", "FSDPModule")


@dataclass(frozen=True)
class FsdpSetting:
    """Whether the model is going to be trained under FSDP, and how that was found out.

    Attributes:
        enabled: FSDP is in use.
        version: 1 (``FullyShardedDataParallel``), 2 (``fully_shard``) or ``None`` when unknown
            (then FSDP1's stricter rules apply).
        source: what the decision rests on (the argument, an environment variable, the model).
        activation_checkpointing: FSDP applies its own activation checkpointing
            (``FSDP_ACTIVATION_CHECKPOINTING``), so kbitprep must not add a second one.
    """

    enabled: bool
    version: int | None = None
    source: str = ""
    activation_checkpointing: bool = False

    @property
    def uniform_dtype(self) -> bool:
        """Whether FSDP1's rule (one floating-point dtype per flattened unit) applies."""
        return self.enabled and self.version != 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "enabled": self.enabled,
            "version": self.version,
            "source": self.source,
            "activation_checkpointing": self.activation_checkpointing,
        }


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


def _env_version(env: Mapping[str, str]) -> int | None:
    raw = env.get("FSDP_VERSION")
    if raw is None:
        return None
    try:
        version = int(raw)
    except ValueError:
        return None
    return version if version in (1, 2) else None


def _wrapped_by_fsdp(model: nn.Module) -> int | None:
    for mod in module_index(model).values():  # the plan's index: no walk of its own
        for base in type(mod).__mro__:
            if base.__qualname__ == "FullyShardedDataParallel":
                return 1
            if base.__qualname__ == "FSDPModule":
                return 2
    return None


def detect_fsdp(
    fsdp: bool | int | None = None,
    *,
    model: nn.Module | None = None,
    environ: Mapping[str, str] | None = None,
) -> FsdpSetting:
    """Decide whether the model will be trained under FSDP.

    Args:
        fsdp: the caller's choice: ``True`` (FSDP, version from ``FSDP_VERSION`` if set),
            ``1`` or ``2`` (that FSDP version), ``False`` (no FSDP, whatever the environment says),
            or ``None`` to detect it from accelerate's environment variables
            (``ACCELERATE_USE_FSDP``, ``FSDP_*``) and from FSDP wrappers already on the model.
        model: the model, to notice an FSDP wrapper already applied.
        environ: the environment to read (default ``os.environ``).

    Raises:
        InvalidPolicyError: ``fsdp`` is not one of the values above.
    """
    env = os.environ if environ is None else environ
    ac = _truthy(env.get("FSDP_ACTIVATION_CHECKPOINTING"))
    if fsdp is False:
        return FsdpSetting(False, source="fsdp=False")
    if fsdp is True:
        return FsdpSetting(True, _env_version(env), "fsdp=True argument", ac)
    if fsdp is not None:
        if not isinstance(fsdp, int) or fsdp not in (1, 2):
            raise InvalidPolicyError(
                f"fsdp={fsdp!r} is not valid; valid choices: None (detect), True, False, 1 (FSDP1), 2 (FSDP2)"
            )
        return FsdpSetting(True, int(fsdp), f"fsdp={fsdp} argument", ac)
    flag = env.get(ACCELERATE_USE_FSDP)
    if flag is not None and not _truthy(flag):
        return FsdpSetting(False, source=f"{ACCELERATE_USE_FSDP}={flag}")
    if _truthy(flag):
        return FsdpSetting(True, _env_version(env), f"{ACCELERATE_USE_FSDP}={flag}", ac)
    present = [v for v in FSDP_ENV_VARIABLES if v in env]
    if present:
        return FsdpSetting(True, _env_version(env), "environment: " + ", ".join(present), ac)
    if model is not None:
        version = _wrapped_by_fsdp(model)
        if version is not None:
            return FsdpSetting(True, version, f"the model is already wrapped by FSDP{version}")
    return FsdpSetting(False, source=f"no fsdp= argument, no {ACCELERATE_USE_FSDP} or FSDP_* variable")


def fsdp_choices(
    setting: FsdpSetting,
    decl: Declarations,
    upcast: Any,
    checkpointing: bool | str | CheckpointMode | None,
) -> tuple[Any, bool | str | CheckpointMode | None, list[str], str | None]:
    """Adjust the user's upcast and checkpointing choices for FSDP.

    Returns ``(upcast, checkpointing, notes, checkpointing_note)``; ``checkpointing_note`` replaces
    the plan's note on how the mode was chosen when FSDP decided it (else ``None``).

    * no upcast unless the caller asked for one (then ``check_fsdp_dtypes`` checks the result);
    * FSDP's own activation checkpointing on: kbitprep's stays off (both at once would checkpoint
      twice; an explicit mode is refused);
    * otherwise the default checkpointing mode becomes non-reentrant where the backend supports
      it (PyTorch's recommendation for FSDP).

    Raises:
        InvalidPolicyError: the caller asked for checkpointing while FSDP checkpoints itself.
    """
    notes: list[str] = []
    ckpt_note: str | None = None
    where = f"FSDP{setting.version or ''} ({setting.source})"
    if upcast is None:
        upcast = "none"
        notes.append(
            f"{where}: no fp32 upcast, so every frozen parameter keeps its loaded dtype and each FSDP unit "
            "has one dtype (PEFT's upcast breaks FSDP: 'Must flatten tensors with uniform dtype')"
        )
    if setting.activation_checkpointing:
        if checkpointing in (True, None):
            notes.append(f"{where}: FSDP_ACTIVATION_CHECKPOINTING is on; kbitprep leaves checkpointing to FSDP")
            return upcast, False, notes, "FSDP applies its own activation checkpointing"
        if checkpointing not in (False, CheckpointMode.OFF, "off"):
            raise InvalidPolicyError(
                f"checkpointing={checkpointing!r} conflicts with FSDP_ACTIVATION_CHECKPOINTING=true: both would "
                "checkpoint every layer. Pass checkpointing=False (FSDP checkpoints) or turn FSDP's off"
            )
    if checkpointing in (True, None) and CheckpointMode.NON_REENTRANT in decl.checkpointing:
        checkpointing = CheckpointMode.NON_REENTRANT
        ckpt_note = "non-reentrant under FSDP (PyTorch's recommendation for FSDP)"
    return upcast, checkpointing, notes, ckpt_note


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_fsdp_dtypes(
    model: nn.Module,
    params: Sequence[ParamPlan],
    setting: FsdpSetting,
    *,
    upcast_label: str,
    storage: ShardedStorage | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Check that the parameters FSDP will shard have the dtypes it accepts, after the planned upcast.

    Returns ``(notes, extras)``. Raises or warns (:class:`~kbitprep.FsdpWarning`) as follows:

    * packed storage (``storage``, declared by the backend, e.g. bitsandbytes 4-bit's
      ``bnb_4bit_quant_storage``) in another dtype than the other parameters: raises under FSDP1 /
      unknown version (FSDP1 refuses to flatten it), warns under FSDP2;
    * a storage dtype that differs from the backend's compute dtype: warns;
    * an upcast policy the caller chose that leaves more than one dtype: raises under FSDP1;
    * any other mix of dtypes (as loaded): warns;
    * adapters in another dtype than the base: a note (FSDP1 needs them in the base dtype or in
      their own units; FSDP2 accepts them).

    Raises:
        UnsupportedModelError: a packed-storage dtype FSDP1 cannot flatten with the rest.
        InvalidPolicyError: the chosen upcast policy mixes dtypes inside FSDP1 units.
    """
    notes: list[str] = []
    base = [p for p in params if not p.adapter]
    floats = sorted({p.dtype_after for p in base if not p.quantized}, key=str)
    everything = sorted({p.dtype_after for p in base}, key=str)
    extras: dict[str, Any] = {"dtypes": [_short(d) for d in everything]}
    where = f"FSDP{setting.version or ''}"

    if storage is not None:
        packed = set(storage.tensors)
        others = sorted({p.dtype_before for p in base if not set(p.aliases) & packed and not p.quantized}, key=str)
        stored = storage.dtype
        compute = storage.compute_dtype
        extras[storage.setting] = _short(stored) if stored else None
        if storage.compute_setting:
            extras[storage.compute_setting] = _short(compute) if compute else None
        upcast = [p.name for p in base if p.upcast]
        if upcast and setting.uniform_dtype:
            raise InvalidPolicyError(
                f"upcast={upcast_label!r} casts {len(upcast)} parameters (e.g. {upcast[0]!r}) to fp32 while the packed "
                f"weights stay {_short(stored) if stored else 'as stored'}; {where} flattens each unit into one "
                "tensor of a single dtype ('Must flatten tensors with uniform dtype'): use upcast='none' (the FSDP "
                "default)"
            )
        target = others[0] if len(others) == 1 else (compute or torch.bfloat16)
        if stored is not None and stored != target:
            msg = (
                f"this model stores its packed weights as {_short(stored)} ({storage.setting}) while its other "
                f"parameters are {', '.join(map(_short, others)) or '?'}; FSDP1 flattens each unit into one tensor "
                "of a single floating-point dtype ('Cannot flatten integer dtype tensors'). Reload it with "
                f"{storage.reload_hint(target)} (the dtype of the rest of the model)"
            )
            if setting.uniform_dtype:
                raise UnsupportedModelError(msg)
            warnings.warn(f"kbitprep: {msg}; FSDP2 shards per parameter and accepts it", FsdpWarning, stacklevel=4)
            notes.append(f"{where}: {storage.setting} differs from the model dtype (accepted by FSDP2)")
        elif stored is not None:
            notes.append(
                f"{where}: {storage.setting}={_short(stored)} matches the other parameters, "
                "so each FSDP unit has one dtype"
            )
        if compute is not None and stored is not None and stored.is_floating_point and compute != stored:
            warnings.warn(
                f"kbitprep: {storage.compute_setting}={_short(compute)} differs from {storage.setting}="
                f"{_short(stored)}; for FSDP use the same dtype for both (and for the model's dtype)",
                FsdpWarning,
                stacklevel=4,
            )
            notes.append(f"{where}: {storage.compute_setting} differs from {storage.setting}")
    else:
        mixed = len(everything) > 1 or any(not d.is_floating_point for d in everything)
        upcast_made_it = len({p.dtype_before for p in base}) < len(everything)
        if mixed and upcast_made_it and upcast_label != "none" and setting.uniform_dtype:
            raise InvalidPolicyError(
                f"upcast={upcast_label!r} leaves parameters in {', '.join(map(_short, everything))} under {where}, "
                "which flattens each unit into one tensor of a single dtype ('Must flatten tensors with uniform "
                "dtype'); use upcast='none' (the FSDP default), or 'all' on a model without quantized storage"
            )
        if mixed:
            kinds = ", ".join(
                f"{_short(d)} (e.g. {next(p.name for p in base if p.dtype_after == d)})" for d in everything
            )
            warnings.warn(
                f"kbitprep: under {where} the model's parameters have several dtypes: {kinds}. FSDP1 needs one "
                "floating-point dtype per wrapped unit; load the model in one dtype, or wrap the odd modules in "
                "their own units (FSDP2 accepts mixed dtypes)",
                FsdpWarning,
                stacklevel=4,
            )
            notes.append(f"{where}: parameters have several dtypes ({', '.join(map(_short, everything))})")
        float_storage = [p for p in base if p.quantized and p.dtype_after.is_floating_point]
        if float_storage:
            notes.append(
                f"{where}: {len(float_storage)} quantized tensors report a float dtype (tensor subclasses "
                "of quantization libraries); whether FSDP can shard them depends on the library (not checked)"
            )

    adapters = sorted({p.dtype_after for p in params if p.adapter}, key=str)
    if adapters and floats and adapters != floats[:1] * len(adapters):
        notes.append(
            f"{where}: adapters are {', '.join(map(_short, adapters))}, the base {_short(floats[0])}; FSDP1 needs "
            "them in the base dtype (get_peft_model(..., autocast_adapter_dtype=False)) or in their own units "
            "(peft.utils.other.fsdp_auto_wrap_policy); FSDP2 accepts them"
        )
    elif not adapters:
        notes.append(
            f"{where}: attach adapters in the base dtype for FSDP1 (get_peft_model(..., "
            "autocast_adapter_dtype=False)); FSDP2 also accepts fp32 adapters"
        )
    return notes, extras
