"""The one place that changes a model: apply a plan atomically, and undo it exactly.

Every change happens inside a transaction: a :class:`~kbitprep._snapshot.Snapshot` is taken first,
and if any step raises (a backend's fix-up, checkpointing, a hook), every change made so far is
reverted before the error propagates. The changes of a committed prepare are kept on the model
(see :func:`prepared_state`) so :func:`undo` can revert them later.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn

from ._anatomy import (
    INPUT_GRADS_MARK,
    Anatomy,
    anatomy,
    count_input_grad_hooks,
    count_layer_input_hooks,
    is_checkpointed_layer,
)
from ._master_weights import MasterWeights
from ._memory import apply_memory_modes
from ._plan_types import Plan, Report
from ._planning import check_plan_matches
from ._saving import guard_saves
from ._snapshot import Changes, Snapshot
from ._tensors import iter_unique_parameters
from .errors import CheckpointingOverrideWarning, NotPreparedError, NotTrainableError, UnsupportedModelError
from .plugin import CheckpointMode, FixUp

__all__ = ["PreparedState", "Report", "apply_plan", "prepared_state", "undo"]

log = logging.getLogger(__name__)
_STATE_ATTR = "_kbitprep_state"
_MISSING: Any = object()
#: Where transformers keeps the handles of the input-require-grads hooks it registers.
_TRANSFORMERS_HOOK_HANDLES = ("_require_grads_hooks", "_require_grads_hook")

_LOCKS_GUARD = threading.Lock()
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises prepare and undo on one model (re-entrant; per model object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@dataclass
class PreparedState:
    """Kept on a prepared model: the report and the changes undo reverts."""

    report: Report
    changes: Changes = field(repr=False)


def prepared_state(model: nn.Module) -> PreparedState | None:
    """The :class:`PreparedState` of a model kbitprep prepared (also through a PEFT wrapper), or ``None``."""
    for mod in model.modules():
        state = vars(mod).get(_STATE_ATTR)
        if isinstance(state, PreparedState):
            return state
    return None


def _record_later(model: nn.Module, changes: Changes, step: str) -> None:
    """Add changes made after prepare by a hook prepare installed (fp32 master weights) to the model's
    record, so that :func:`undo` reverts them too, and the step to its report."""
    state = prepared_state(model)
    if state is not None:
        state.changes.ops.extend(changes.ops)
        state.report = replace(state.report, steps=(*state.report.steps, step))


def _refuse_unusable(model: nn.Module) -> None:
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not meta:
        return
    offloaded = any(hasattr(m, "_hf_hook") for m in model.modules())
    where = (
        "offloaded by accelerate (device_map placed them on 'cpu'/'disk' with offloading)"
        if offloaded
        else "on the meta device (no weights loaded)"
    )
    raise UnsupportedModelError(
        f"{len(meta)} parameters (e.g. {meta[0]!r}) are {where}; prepare needs every weight materialised. "
        "Load the model without offloading (a device_map with enough memory, no 'disk' entries); "
        "kbitprep.plan() works on such models"
    )


def _enable_checkpointing(body: Anatomy, plan: Plan) -> None:
    target = body.target
    if target is None:
        return
    kwargs = dict(plan.checkpointing_kwargs)
    existing = body.existing
    if existing is not None and dict(existing.kwargs) == kwargs:
        return  # already enabled exactly so (by the user): keep it, their wrapper included
    if existing is not None:
        new = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
        warnings.warn(
            f"kbitprep: replaced the checkpointing enabled on the model ({existing.describe()}) with {new} "
            f"({plan.checkpointing_note}); pass checkpointing=... / checkpointing_kwargs=... to choose otherwise",
            CheckpointingOverrideWarning,
            stacklevel=4,
        )
    # transformers hooks the input embeddings of every sub-model, again on those that already carry a hook
    hooked = [m for m in _embedding_modules(body) if count_input_grad_hooks(m)]
    hooks_before = {id(m): set(m._forward_hooks) for m in hooked}
    handles_before = {k: vars(target).get(k, _MISSING) for k in _TRANSFORMERS_HOOK_HANDLES}
    t = cast(Any, target)
    if hasattr(type(target), "activation_checkpointing_enable"):
        t.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        t.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for mod in hooked:  # transformers registers another hook each time: keep one
        for key in [k for k in mod._forward_hooks if k not in hooks_before[id(mod)]]:
            del mod._forward_hooks[key]
    if hooked:
        for attr, value in handles_before.items():
            if value is _MISSING:
                vars(target).pop(attr, None)
            else:
                vars(target)[attr] = value


def _turn_off_use_cache(model: nn.Module, body: Anatomy, plan: Plan) -> None:
    names = set(plan.use_cache_off)
    loaded = []
    for cfg in body.configs:
        if type(cfg).__name__ in names and getattr(cfg, "use_cache", None):
            loaded.append((cfg, cfg.use_cache))
            cfg.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    guard_saves(model, loaded)  # ... and a checkpoint saved after prepare says what the loaded model said


def _make_inputs_require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _make_layer_input_require_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook on a checkpointed layer: its hidden-state input (the first positional argument, as
    transformers passes it for reentrant checkpointing) made to require grad, as a detached alias so the
    caller's tensor is left as it is."""
    if not args or not torch.is_grad_enabled():
        return None
    first = args[0]
    if not isinstance(first, torch.Tensor) or not first.is_floating_point() or first.requires_grad:
        return None
    return (first.detach().requires_grad_(True), *args[1:])


setattr(_make_inputs_require_grad, INPUT_GRADS_MARK, True)
setattr(_make_layer_input_require_grad, INPUT_GRADS_MARK, True)


def _embedding_modules(body: Anatomy) -> list[nn.Module]:
    """The token embeddings and the input embeddings of every sub-model, each once."""
    found = {id(m): m for _, m in body.submodel_embeddings}
    if body.embeddings is not None:
        found.setdefault(id(body.embeddings), body.embeddings)
    return list(found.values())


def _install_input_grads_hook(model: nn.Module, body: Anatomy, plan: Plan) -> None:
    """kbitprep's input-require-grads hooks, where the plan puts them (``Plan.input_grads_hooks``): a forward
    hook on input embeddings, a forward pre-hook on a checkpointed layer; none where one is already there."""
    known = dict(body.submodel_embeddings)
    if body.embeddings is not None:
        known[body.embeddings_name] = body.embeddings
    for name in plan.input_grads_hooks:
        mod = known.get(name) or model.get_submodule(name)
        if is_checkpointed_layer(mod):
            if not count_layer_input_hooks(mod):
                mod.register_forward_pre_hook(_make_layer_input_require_grad)
        elif not count_input_grad_hooks(mod):
            mod.register_forward_hook(_make_inputs_require_grad)


def _hook_keys(mods: list[nn.Module]) -> dict[int, tuple[set[int], set[int]]]:
    return {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in mods}


def _hooks_added(mods: list[nn.Module], before: dict[int, tuple[set[int], set[int]]]) -> tuple[str, ...]:
    """``"Class: hook"`` for each forward hook added since ``before``; ``"Class x n: hook (forward pre-hook)"``
    for the forward pre-hooks added to ``n`` modules of one class (the layers of a stack)."""
    added: list[str] = []
    pre: dict[tuple[str, str], int] = {}
    for mod in mods:
        fwd_before, pre_before = before[id(mod)]
        cls = type(mod).__name__
        added += [
            f"{cls}: {getattr(h, '__name__', repr(h))}" for k, h in mod._forward_hooks.items() if k not in fwd_before
        ]
        for k, h in mod._forward_pre_hooks.items():
            if k not in pre_before:
                key = (cls, getattr(h, "__name__", repr(h)))
                pre[key] = pre.get(key, 0) + 1
    added += [f"{cls}{f' x {n}' if n > 1 else ''}: {hook} (forward pre-hook)" for (cls, hook), n in pre.items()]
    return tuple(added)


def _blame_fixup(exc: Exception, plan: Plan, fix: FixUp) -> None:
    """Add a note to ``exc`` naming the fix-up, its backend and that backend's distribution."""
    owner = next(
        (
            f"backend {b!r} (from {d})"
            for b, d, decl in zip(plan.backends, plan.distributions, plan.declarations)
            if any(f is fix for f in decl.fixups)
        ),
        f"backend {plan.backend!r}",
    )
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"kbitprep: raised by fix-up {fix.name!r} of {owner}; the model was restored as it was")


def apply_plan(model: nn.Module, plan: Plan, *, clear_cache: bool = True) -> Report:
    """Apply ``plan`` to ``model`` atomically and record how to undo it. Returns the report.

    Raises:
        PlanMismatchError: the plan was made for another model.
        NotTrainableError: the backend declared the model untrainable.
        UnsupportedModelError: weights on the meta device or offloaded.
        Exception: whatever a step raised; the model is then exactly as before.
    """
    check_plan_matches(plan, model)
    if not plan.trainable:
        raise NotTrainableError(
            f"backend {plan.backend!r} says this model cannot be trained: {plan.not_trainable_reason}"
        )
    _refuse_unusable(model)

    started = time.perf_counter()
    by_name = {aliases[0]: p for _, aliases, p, _ in iter_unique_parameters(model)}
    body = anatomy(model)  # the model's parts, found once for the whole apply
    watched = _embedding_modules(body) + [layer for stack in body.stacks for _, layer in stack.layers]
    hooks_before = _hook_keys(watched)
    snapshot = Snapshot(model, configs=body.configs)
    steps: list[str] = []
    upcast_ids: set[int] = set()
    try:
        for pp in plan.to_freeze:
            by_name[pp.name].requires_grad_(False)
        steps.append(f"froze {len(plan.to_freeze)} parameters")
        for fix in plan.fixups:
            try:
                fix.apply(model)
            except Exception as exc:  # name the plugin to blame; the revert below restores the model
                _blame_fixup(exc, plan, fix)
                raise
            steps.append(f"fix-up {fix.name}")
        for pp in plan.to_upcast:
            p = by_name[pp.name]
            p.data = p.data.to(pp.dtype_after)
            upcast_ids.add(id(p))
        steps.append(f"upcast {len(plan.to_upcast)} parameters to fp32")
        if plan.checkpointing is not CheckpointMode.OFF:
            _enable_checkpointing(body, plan)
            steps.append(f"enabled {plan.checkpointing.value} checkpointing")
            _install_input_grads_hook(model, body, plan)
        if plan.use_cache_off:
            _turn_off_use_cache(model, body, plan)
            steps.append(f"use_cache off on {', '.join(plan.use_cache_off)}")
        if plan.master_weights:
            model.register_forward_pre_hook(MasterWeights(_record_later))
            steps.append("fp32 master weights hook (for parameters made trainable after prepare)")
        done = apply_memory_modes(model, plan)  # the last step: it patches forwards of a prepared model
        if done:
            steps.append(done)
        changes = snapshot.changes()
    except BaseException as exc:
        reverted = snapshot.changes()
        reverted.revert()
        log.info(
            "prepare of %s failed (%s: %s); reverted %d changes", type(model).__name__, type(exc).__name__, exc,
            len(reverted.ops),
        )  # fmt: skip
        raise
    changes.release_upcast_storage(lambda t: id(t) in upcast_ids)
    if clear_cache and torch.cuda.is_available() and plan.to_upcast:
        torch.cuda.empty_cache()
    hooks_added = _hooks_added(watched, hooks_before)
    report = Report(plan, time.perf_counter() - started, hooks_added, tuple(steps))
    vars(model)[_STATE_ATTR] = PreparedState(report, changes)
    log.info(
        "prepared %s with backend %s in %.1f ms: %s",
        type(model).__name__,
        plan.backend,
        report.seconds * 1000,
        "; ".join(steps),
    )
    return report


def undo(model: nn.Module) -> nn.Module:
    """Revert everything :func:`kbitprep.prepare` changed on ``model``, exactly. Returns the model.

    Dtypes and values (an fp16/bf16 -> fp32 -> fp16/bf16 round trip is lossless), ``requires_grad``,
    hooks, checkpointing flags and ``use_cache`` come back as they were; adapters attached after
    prepare are left in place.

    Raises:
        NotPreparedError: kbitprep has not prepared this model.
    """
    for mod in model.modules():
        state = vars(mod).get(_STATE_ATTR)
        if isinstance(state, PreparedState):
            state.changes.revert()
            del vars(mod)[_STATE_ATTR]
            log.info("undid prepare of %s: reverted %d changes", type(model).__name__, len(state.changes.ops))
            return model
    raise NotPreparedError(f"this {type(model).__name__} was not prepared by kbitprep; there is nothing to undo")
