"""The user-facing pipeline: plan -> prepare -> (verify) -> undo, and PEFT's drop-in replacement."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

from torch import nn

from ._gradflow import verify_gradient_flow
from ._memory import MemoryChoice
from ._mutation import apply_plan, model_lock, prepared_state
from ._mutation import undo as _undo
from ._peft_rules import peft_rules
from ._plan_types import Plan, Report
from ._planning import build_plan
from ._policies import UpcastPolicy
from ._registry import Registry, strict_mode
from .errors import AlreadyPreparedWarning, InvalidPolicyError, NotAModuleError, NotPreparedError
from .plugin import CheckpointMode

__all__ = ["plan", "prepare", "prepare_model_for_kbit_training", "report", "undo"]

M = TypeVar("M", bound=nn.Module)

_PLAN_KEYWORDS = (
    "backend",
    "upcast",
    "checkpointing",
    "checkpointing_kwargs",
    "allow_mismatch",
    "strict",
    "registry",
    "memory",
    "fsdp",
)
_PREPARE_KEYWORDS = (*_PLAN_KEYWORDS, "verify", "plan")


def _reject_unknown(func: str, unknown: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    if unknown:
        names = ", ".join(sorted(unknown))
        raise InvalidPolicyError(
            f"{func}() got unknown keyword argument(s) {names}; valid keywords: {', '.join(valid)}"
        )


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"kbitprep expects a torch.nn.Module (a loaded transformers model), got {type(model).__name__}"
        )


def plan(
    model: nn.Module,
    *,
    backend: str | None = None,
    upcast: UpcastPolicy = None,
    checkpointing: bool | str | CheckpointMode | None = True,
    checkpointing_kwargs: Mapping[str, Any] | None = None,
    allow_mismatch: bool = False,
    strict: bool | None = None,
    registry: Registry | None = None,
    memory: MemoryChoice = None,
    fsdp: bool | int | None = None,
    **unknown: Any,
) -> Plan:
    """Work out what :func:`prepare` would do to ``model``, changing nothing.

    Args:
        model: a loaded (possibly quantized, possibly PEFT-wrapped) model.
        backend: the backend to use by name; ``None`` lets the registry detect it.
        upcast: ``"none"``, ``"norms"``, ``"all"`` (PEFT's choice) or ``fn(name, param, module) -> bool``;
            ``None`` takes the backend's default.
        checkpointing: ``True`` (the backend's default mode), ``False``, ``"reentrant"`` or ``"non_reentrant"``.
        checkpointing_kwargs: extra keyword arguments for ``torch.utils.checkpoint.checkpoint``;
            ``use_reentrant`` is always set from the mode.
        allow_mismatch: use ``backend`` even if it does not recognise the model.
        strict: make broken plugins raise (default: the ``KBITPREP_STRICT`` environment variable).
        registry: the backend registry (default: the process-wide one).
        memory: memory modes: ``"default"`` (or ``None``), ``"chunked_head"`` (output head and loss in
            checkpointed 256-token chunks; the model then returns ``logits=None`` when trained with
            labels), ``"offload"`` (tensors saved for backward kept in pinned CPU memory) or
            ``"lowest"`` (no upcast + reentrant checkpointing + both); or a mapping such as
            ``{"preset": "lowest", "chunked_head": 512}``. A preset fills in ``upcast`` /
            ``checkpointing`` only where they are left at their defaults.
        fsdp: the model will be trained under FSDP: ``True``, ``1`` (FSDP1), ``2`` (FSDP2) or
            ``False``; ``None`` detects it from accelerate's environment (``ACCELERATE_USE_FSDP``,
            ``FSDP_*``). Under FSDP nothing is upcast unless asked (each FSDP unit keeps one dtype),
            checkpointing defaults to non-reentrant, and the parameter dtypes are checked, including a
            bitsandbytes 4-bit ``bnb_4bit_quant_storage`` that must match the model's dtype.

    Returns:
        The :class:`~kbitprep.Plan`; ``print(plan)`` shows it, ``plan.to_dict()`` gives data.

    Raises:
        KbitprepError: a subclass saying what is wrong with the model, the backend or an option.

    Example:
        >>> import torch, kbitprep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        >>> p = kbitprep.plan(model)
        >>> p.backend, len(p.to_freeze), p.byte_delta
        ('unquantized', 2, 0)
    """
    _check_module(model)
    _reject_unknown("plan", unknown, _PLAN_KEYWORDS)
    options: dict[str, Any] = {
        "backend": backend,
        "upcast": upcast,
        "checkpointing": checkpointing,
        "checkpointing_kwargs": checkpointing_kwargs,
        "allow_mismatch": allow_mismatch,
        "registry": registry,
        "memory": memory,
        "fsdp": fsdp,
    }
    with strict_mode(strict):
        return build_plan(model, **options)


def prepare(
    model: M,
    *,
    backend: str | None = None,
    upcast: UpcastPolicy = None,
    checkpointing: bool | str | CheckpointMode | None = True,
    checkpointing_kwargs: Mapping[str, Any] | None = None,
    verify: bool = False,
    allow_mismatch: bool = False,
    strict: bool | None = None,
    registry: Registry | None = None,
    plan: Plan | None = None,
    memory: MemoryChoice = None,
    fsdp: bool | int | None = None,
    **unknown: Any,
) -> M:
    """Prepare ``model`` for LoRA/QLoRA training and return it (the same object).

    Freezes the base model, upcasts what the policy chooses, enables checkpointing as the backend
    declares, installs the input-require-grads hook where needed, and runs the backend's fix-ups;
    all or nothing. The applied :class:`~kbitprep.Report` is readable with :func:`report`, and
    :func:`undo` reverts it exactly. Preparing a model kbitprep already prepared changes nothing
    and warns (:class:`~kbitprep.errors.AlreadyPreparedWarning`).

    Args:
        model: the model; see :func:`plan` for the other options.
        verify: after preparing, run a tiny forward/backward and raise
            :class:`~kbitprep.errors.GradientFlowError` (with the model restored) if a parameter
            that should train gets no gradient.
        plan: apply this plan (from :func:`plan`) instead of computing one; the other planning
            options are then ignored.

    Raises:
        KbitprepError: a subclass saying what is wrong; the model is left exactly as it was.

    Example:
        >>> import torch, kbitprep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        >>> _ = kbitprep.prepare(model)
        >>> any(p.requires_grad for p in model.parameters())
        False
        >>> _ = kbitprep.undo(model)
        >>> all(p.requires_grad for p in model.parameters())
        True
    """
    _check_module(model)
    _reject_unknown("prepare", unknown, _PREPARE_KEYWORDS)
    for name, value in (("verify", verify), ("allow_mismatch", allow_mismatch)):
        if not isinstance(value, bool):
            raise InvalidPolicyError(f"prepare({name}=...) takes True or False, got {value!r}")
    if plan is not None and not isinstance(plan, Plan):
        raise InvalidPolicyError(f"plan= takes a kbitprep.Plan made by kbitprep.plan(model), got {type(plan).__name__}")
    options: dict[str, Any] = {
        "backend": backend,
        "upcast": upcast,
        "checkpointing": checkpointing,
        "checkpointing_kwargs": checkpointing_kwargs,
        "allow_mismatch": allow_mismatch,
        "registry": registry,
        "memory": memory,
        "fsdp": fsdp,
    }
    with model_lock(model):  # a second thread waits, then finds the model prepared (a no-op)
        state = prepared_state(model)
        if state is not None:
            warnings.warn(
                f"kbitprep: this model is already prepared (backend {state.report.plan.backend!r}); nothing was "
                "changed. Call kbitprep.undo(model) first to prepare it differently",
                AlreadyPreparedWarning,
                stacklevel=2,
            )
            return model
        with strict_mode(strict):
            if plan is None:
                plan = build_plan(model, **options)
            apply_plan(model, plan)
        if verify:
            try:
                flow = verify_gradient_flow(model)
            except BaseException:
                _undo(model)
                raise
            prepared = prepared_state(model)
            if prepared is not None:  # the report shows the check wherever it ran
                zero = f"; {len(flow.zero_grad)} exactly zero (lora_A at step 0)" if flow.zero_grad else ""
                prepared.report = replace(
                    prepared.report,
                    gradient_flow=f"passed - {flow.with_grad} of {flow.checked} trainable parameters got a gradient"
                    + zero,
                )
    return model


def report(model: nn.Module) -> Report:
    """The :class:`~kbitprep.Report` of a model :func:`prepare` prepared.

    Raises:
        NotPreparedError: the model was not prepared by kbitprep.
    """
    _check_module(model)
    state = prepared_state(model)
    if state is None:
        raise NotPreparedError(f"this {type(model).__name__} was not prepared by kbitprep")
    return state.report


def undo(model: M) -> M:
    """Revert everything :func:`prepare` changed, exactly, and return the model.

    Dtypes and values, ``requires_grad``, hooks, checkpointing flags and ``use_cache`` come back
    as they were; adapters attached after prepare stay.

    Raises:
        NotPreparedError: the model was not prepared by kbitprep.
    """
    _check_module(model)
    with model_lock(model):
        _undo(model)
    return model


def prepare_model_for_kbit_training(
    model: M,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> M:
    """Drop-in replacement for ``peft.prepare_model_for_kbit_training`` (PEFT 0.21 signature and results).

    Wherever PEFT's function succeeds, the resulting parameter dtypes, ``requires_grad`` flags and
    checkpointing state match it, and an input-require-grads hook is present exactly when PEFT's
    function leaves one. Differences, all deliberate: it never stacks a second input-grads hook
    (PEFT with transformers 5 leaves two identical ones), it always passes ``use_reentrant``
    explicitly (the value PEFT's empty kwargs mean: ``True``), it casts quantized tensor subclasses
    only where that cast succeeds (torchao's: only their scales change; where it raises, as with
    optimum-quanto, it follows the backend's ``allow_upcast``, so the forward keeps working), it
    leaves ``use_cache`` alone as PEFT does, it does not re-freeze the adapters of a
    PEFT-wrapped model, calling it twice is a no-op, and :func:`undo` reverts it. A model whose
    backend declares it untrainable (e.g. AQLM 8-bit codebooks on CPU) raises
    :class:`~kbitprep.errors.NotTrainableError` up front, where PEFT's function returns a model that
    fails at the first training step.

    For kbitprep's better defaults (no fp32 upcast of frozen weights, checkpointing for every
    backend), call :func:`prepare` instead.
    """
    _check_module(model)
    with model_lock(model):
        if prepared_state(model) is not None:
            return prepare(model)  # warns and changes nothing
        return _peft_rules_prepare(model, use_gradient_checkpointing, gradient_checkpointing_kwargs, auto_clear_cache)


def _peft_rules_prepare(
    model: M,
    use_gradient_checkpointing: bool,
    gradient_checkpointing_kwargs: dict[str, Any] | None,
    auto_clear_cache: bool,
) -> M:
    rules = peft_rules(
        model,
        use_gradient_checkpointing=use_gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
    the_plan = build_plan(
        model,
        **rules.plan_kwargs(),
        peft_compat=True,
    )
    apply_plan(model, the_plan, clear_cache=auto_clear_cache)
    return model
