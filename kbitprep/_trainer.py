"""Training with transformers' ``Trainer`` and TRL's ``SFTTrainer`` on a model kbitprep prepared.

What the trainers do with ``gradient_checkpointing=True`` (transformers 5.24, TRL 1.16), read from
their source:

* ``Trainer.train()`` calls ``model.activation_checkpointing_enable(kwargs)`` again. With no
  ``gradient_checkpointing_kwargs`` transformers passes ``{"use_reentrant": False}``, silently
  replacing the mode kbitprep chose, and ``enable_input_require_grads()`` registers one more
  input-require-grads hook on the embeddings every time it runs (the old hook stays, its handle
  is overwritten).
* ``SFTTrainer`` (``SFTConfig.gradient_checkpointing`` defaults to ``True``) additionally calls
  ``model.enable_input_require_grads()`` on a PEFT model: a third hook.
* Under DDP, ``Trainer`` asks for ``find_unused_parameters=True`` for any model that is not a
  ``PreTrainedModel`` (a ``PeftModel`` is not), which reentrant checkpointing does not survive.

:func:`~kbitprep.training_arguments_for` returns a copy of the arguments aligned with what kbitprep did,
and :func:`~kbitprep.checkpointing_status` reads the resulting state off a model.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ._anatomy import count_input_grad_hooks, input_embeddings
from ._mutation import prepared_state
from .errors import CheckpointingConflictWarning, InvalidPolicyError, NotPreparedError
from .plugin import CheckpointMode

__all__ = ["CheckpointingConflictWarning", "CheckpointingStatus", "checkpointing_status", "training_arguments_for"]

A = TypeVar("A")


@dataclass(frozen=True)
class CheckpointingStatus:
    """The activation-checkpointing state of a (transformers) model, read off its modules.

    Attributes:
        enabled: at least one layer checkpoints.
        layers: how many modules have ``gradient_checkpointing`` on.
        use_reentrant: the ``use_reentrant`` the layers' checkpoint function passes; ``None`` when
            checkpointing is off, the value is not passed, or layers disagree (see ``consistent``).
        consistent: every checkpointing layer uses the same function and ``use_reentrant``.
        input_grads_hooks: input-require-grads hooks on the input embeddings (1 is right for
            reentrant checkpointing with a frozen embedding; more means someone added a duplicate).
    """

    enabled: bool
    layers: int
    use_reentrant: bool | None
    consistent: bool
    input_grads_hooks: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "enabled": self.enabled,
            "layers": self.layers,
            "use_reentrant": self.use_reentrant,
            "consistent": self.consistent,
            "input_grads_hooks": self.input_grads_hooks,
        }


def _use_reentrant_of(fn: object) -> bool | None:
    while isinstance(fn, functools.partial):
        if "use_reentrant" in fn.keywords:
            return bool(fn.keywords["use_reentrant"])
        fn = fn.func
    return None


def checkpointing_status(model: nn.Module) -> CheckpointingStatus:
    """Read the checkpointing state of ``model`` (also through a PEFT or DDP wrapper).

    Counts the modules with ``gradient_checkpointing`` on, the ``use_reentrant`` their checkpoint
    function carries, and the input-require-grads hooks on the input embeddings.
    """
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    values = {_use_reentrant_of(getattr(m, "_gradient_checkpointing_func", None)) for m in on}
    consistent = len(values) <= 1
    use_reentrant = next(iter(values)) if len(values) == 1 else None
    return CheckpointingStatus(
        enabled=bool(on),
        layers=len(on),
        use_reentrant=use_reentrant,
        consistent=consistent,
        input_grads_hooks=count_input_grad_hooks(input_embeddings(model)),
    )


def _read(args: Any, new: str, old: str) -> Any:
    value = getattr(args, new, None)
    return getattr(args, old, None) if value is None else value


def _set(args: Any, value: Any, *names: str) -> None:
    for name in names:
        if hasattr(args, name):
            setattr(args, name, value)


def _uses_fsdp(args: Any) -> bool:
    fsdp = getattr(args, "fsdp", None)
    return bool(fsdp) and fsdp not in ("", [], "no")


def training_arguments_for(model: nn.Module, args: A) -> A:
    """Return a copy of ``args`` (``transformers.TrainingArguments`` or a TRL config such as
    ``SFTConfig``) aligned with how kbitprep prepared ``model``. ``args`` itself is not changed.

    When kbitprep enabled checkpointing:

    * ``gradient_checkpointing`` / ``activation_checkpointing`` are turned off in the copy, so the
      trainer does not enable checkpointing a second time (which would replace kbitprep's
      ``use_reentrant`` with the trainer's and stack a second and third input-require-grads hook).
      The model still checkpoints exactly as kbitprep set it up.
    * ``ddp_find_unused_parameters`` left at ``None`` becomes ``False``: the Trainer would ask DDP
      to look for unused parameters on a PEFT model, which reentrant checkpointing does not survive.
    * A ``use_reentrant`` in ``gradient_checkpointing_kwargs`` that contradicts kbitprep's mode, or
      other keys there (``every_n_layers``, ``offload``, ...), raise a
      :class:`~kbitprep.CheckpointingConflictWarning`: kbitprep's choice stays in force; prepare again with
      ``checkpointing=`` / ``checkpointing_kwargs=`` / ``memory=`` to change it.

    When kbitprep left checkpointing off, the trainer's setting is kept, except that a backend
    that supports no checkpointing turns it off (with a warning), and a mode the backend does not
    support warns.

    When kbitprep's offload is installed (``memory="offload"`` / ``"lowest"``), TRL's
    ``activation_offloading`` is turned off in the copy (with a warning): one offload runs, kbitprep's.
    Without the copy, kbitprep's offload steps aside at run time for TRL's (see :func:`kbitprep.memory_modes`).

    Under FSDP (``args.fsdp``) on a model prepared without kbitprep's FSDP policy it warns.

    Args:
        model: the prepared model (or the PEFT model around it).
        args: the trainer's arguments.

    Returns:
        A shallow copy of ``args`` with the aligned values.

    Raises:
        NotPreparedError: ``model`` was not prepared by kbitprep.
        InvalidPolicyError: ``args`` has no checkpointing fields (not training arguments).

    Example::

        model = kbitprep.prepare(model)
        model = peft.get_peft_model(model, lora_config)
        args = kbitprep.training_arguments_for(model, TrainingArguments(..., gradient_checkpointing=True))
        Trainer(model=model, args=args, train_dataset=ds).train()
    """
    state = prepared_state(model)
    if state is None:
        raise NotPreparedError(
            f"this {type(model).__name__} was not prepared by kbitprep; call kbitprep.prepare(model) before "
            "kbitprep.training_arguments_for(model, args)"
        )
    if not (hasattr(args, "gradient_checkpointing") or hasattr(args, "activation_checkpointing")):
        raise InvalidPolicyError(
            f"training_arguments_for() expects transformers.TrainingArguments (or a TRL config), got "
            f"{type(args).__name__}"
        )
    plan = state.report.plan
    wants = bool(_read(args, "activation_checkpointing", "gradient_checkpointing"))
    raw_kwargs = _read(args, "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
    kwargs: dict[str, Any] = dict(raw_kwargs) if isinstance(raw_kwargs, Mapping) else {}
    new = copy.copy(args)
    supported = (
        frozenset.intersection(*(d.checkpointing for d in plan.declarations))
        if plan.declarations
        else (frozenset(CheckpointMode) - {CheckpointMode.OFF})
    )

    if plan.checkpointing is not CheckpointMode.OFF:
        ours = plan.checkpointing is CheckpointMode.REENTRANT
        if wants:
            _set(new, False, "activation_checkpointing", "gradient_checkpointing")
            _set(new, None, "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
            if "use_reentrant" in kwargs and bool(kwargs["use_reentrant"]) != ours:
                warnings.warn(
                    f"kbitprep: the training arguments ask for use_reentrant={bool(kwargs['use_reentrant'])} but "
                    f"kbitprep prepared {plan.checkpointing.value} checkpointing (use_reentrant={ours}); kbitprep's "
                    "choice is kept and the trainer will not enable checkpointing again. To change it: "
                    "kbitprep.undo(model), then prepare(model, checkpointing="
                    f"{'non_reentrant' if ours else 'reentrant'!r})",
                    CheckpointingConflictWarning,
                    stacklevel=2,
                )
            others = sorted(k for k in kwargs if k != "use_reentrant")
            if others:
                warnings.warn(
                    f"kbitprep: gradient_checkpointing_kwargs keys {', '.join(others)} are ignored, because kbitprep "
                    "already enabled checkpointing; pass torch.utils.checkpoint options to "
                    "kbitprep.prepare(model, checkpointing_kwargs=...) and offloading with memory='offload'",
                    CheckpointingConflictWarning,
                    stacklevel=2,
                )
        if hasattr(new, "ddp_find_unused_parameters") and getattr(args, "ddp_find_unused_parameters", None) is None:
            new.ddp_find_unused_parameters = False
    elif wants:
        requested = CheckpointMode.REENTRANT if kwargs.get("use_reentrant", False) else CheckpointMode.NON_REENTRANT
        if not supported:
            _set(new, False, "activation_checkpointing", "gradient_checkpointing")
            warnings.warn(
                f"kbitprep: backend {plan.backend!r} supports no checkpointing ({plan.checkpointing_note}); "
                "gradient_checkpointing is turned off in the returned arguments",
                CheckpointingConflictWarning,
                stacklevel=2,
            )
        elif requested not in supported:
            warnings.warn(
                f"kbitprep: the trainer will enable {requested.value} checkpointing, which backend "
                f"{plan.backend!r} does not support (supported: {', '.join(sorted(m.value for m in supported))}); "
                "set gradient_checkpointing_kwargs={'use_reentrant': ...} accordingly",
                CheckpointingConflictWarning,
                stacklevel=2,
            )

    memory = plan.memory if isinstance(plan.memory, Mapping) else {}
    if memory.get("offload") and getattr(args, "activation_offloading", False):
        new.activation_offloading = False  # type: ignore[attr-defined]
        warnings.warn(
            "kbitprep: the training arguments ask for TRL's activation_offloading, and kbitprep's offload is "
            "installed (memory=...); two offloads at once would copy the same tensors twice, so "
            "activation_offloading is turned off in the returned arguments and kbitprep's offload runs. To run "
            "TRL's instead: kbitprep.set_memory_modes(model, offload=False)",
            CheckpointingConflictWarning,
            stacklevel=2,
        )

    fsdp_info = plan.fsdp
    if _uses_fsdp(args) and not (isinstance(fsdp_info, Mapping) and fsdp_info.get("enabled")):
        upcast = len(plan.to_upcast)
        why = f" ({upcast} parameters were upcast to fp32, which FSDP1 cannot flatten with the rest)" if upcast else ""
        warnings.warn(
            "kbitprep: the training arguments use FSDP but the model was prepared without kbitprep's FSDP policy"
            + why
            + "; call kbitprep.undo(model) and kbitprep.prepare(model, fsdp=True)",
            CheckpointingConflictWarning,
            stacklevel=2,
        )
    fsdp_config = getattr(args, "fsdp_config", None)
    if (
        _uses_fsdp(args)
        and isinstance(fsdp_config, Mapping)
        and str(fsdp_config.get("activation_checkpointing", "false")).lower() in ("true", "1")
        and plan.checkpointing is not CheckpointMode.OFF
    ):
        warnings.warn(
            "kbitprep: fsdp_config['activation_checkpointing'] is on and kbitprep also enabled checkpointing; "
            "every layer would be checkpointed twice. Prepare with kbitprep.prepare(model, fsdp=True, "
            "checkpointing=False)",
            CheckpointingConflictWarning,
            stacklevel=2,
        )
    return new
