"""Building a :class:`Plan`: what prepare would do to a model, computed without changing it."""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._anatomy import Anatomy, Stack, anatomy, count_input_grad_hooks, count_layer_input_hooks
from ._fsdp import FsdpSetting, check_fsdp_dtypes, detect_fsdp, fsdp_choices
from ._master_weights import MASTER_WEIGHTS_NOTE
from ._memory import MemoryChoice, MemoryModes, memory_plan, preset_options, resolve_memory
from ._peft_rules import peft_casts
from ._plan_types import ParamPlan, Plan
from ._policies import UpcastPolicy, resolve_checkpointing, resolve_upcast, validate_checkpointing_kwargs
from ._registry import Registry, Selection, default_registry, module_index_scope
from ._tensors import iter_unique_parameters, tensor_nbytes
from .errors import BackendWarning, NoParametersError, NotAModuleError, PlanMismatchError
from .plugin import HALF_DTYPES, CheckpointMode, Declarations, class_path, is_plain_tensor, module_index

log = logging.getLogger(__name__)

__all__ = ["ParamPlan", "Plan", "build_plan", "check_plan_matches", "model_fingerprint"]  # the steps: see build_plan


# --------------------------------------------------------------------------- model facts


def model_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """Identity and shape of a model's parameters, to check a plan is applied to the model it was made for.

    The identity is a weak reference (an ``id`` could be reused by another model once the first is gone).
    """
    return (weakref.ref(model), tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()))


def merge_declarations(decls: list[Declarations]) -> Declarations:
    """The declarations of several backends claiming one model, as one: what all of them allow."""
    if len(decls) == 1:
        return decls[0]
    modes = frozenset.intersection(*(d.checkpointing for d in decls))
    first = decls[0]
    default = (
        first.default_checkpointing
        if first.default_checkpointing in modes
        else next(iter(sorted(modes, key=lambda m: m.value)), CheckpointMode.OFF)
    )
    reasons = [d.not_trainable_reason for d in decls if not d.trainable]
    allow = all(d.allow_upcast for d in decls)
    return Declarations(
        quantized=frozenset().union(*(d.quantized for d in decls)),
        allow_upcast=allow,
        upcast_note="; ".join(d.upcast_note for d in decls if d.upcast_note),
        default_upcast=first.default_upcast if allow else "none",
        checkpointing=modes,
        default_checkpointing=default if modes else CheckpointMode.OFF,
        input_grads_hook=any(d.input_grads_hook for d in decls),
        trainable=not reasons,
        not_trainable_reason="; ".join(reasons),
        fixups=tuple(f for d in decls for f in d.fixups),
        notes=tuple(n for d in decls for n in d.notes),
    )


@dataclass(frozen=True)
class Choices:
    """The upcast and checkpointing choices, resolved against the backend (and FSDP, and the memory preset)."""

    policy_label: str
    wants: Callable[[str, torch.Tensor, nn.Module], bool]
    mode: CheckpointMode
    mode_note: str
    modes: MemoryModes | None  # None with peft_compat, which ignores memory=
    fsdp_notes: tuple[str, ...]
    fsdp_mode_note: str | None


@dataclass(frozen=True)
class Checkpointing:
    """The checkpointing the plan enables: mode, how it was chosen, its keywords, and notes."""

    mode: CheckpointMode
    note: str
    kwargs: dict[str, Any]
    keep_existing: bool
    notes: tuple[str, ...]


def build_plan(
    model: nn.Module,
    *,
    backend: str | None = None,
    upcast: UpcastPolicy = None,
    checkpointing: bool | str | CheckpointMode | None = True,
    checkpointing_kwargs: Mapping[str, Any] | None = None,
    allow_mismatch: bool = False,
    registry: Registry | None = None,
    selection: Selection | None = None,
    peft_compat: bool = False,
    memory: MemoryChoice = None,
    fsdp: bool | int | None = None,
) -> Plan:
    """Compute the plan for ``model`` without changing it (see :func:`kbitprep.plan`).

    ``peft_compat`` reproduces PEFT's rules instead of the backend's: upcast every plain fp16/bf16
    parameter PEFT casts (``upcast`` must then be ``"all"`` or ``"none"``), and
    use the checkpointing mode given whatever the backend declares. ``memory`` chooses the memory
    modes (``kbitprep._memory``; carried in ``Plan.memory``); it is ignored with ``peft_compat``.
    ``fsdp`` (``None``: detect from accelerate's environment) applies the FSDP dtype policy of
    ``kbitprep._fsdp`` (carried in ``Plan.fsdp``); also ignored with ``peft_compat``.

    Each step below is a function of its own; none changes the model.
    """
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"kbitprep expects a torch.nn.Module (a loaded transformers model), got {type(model).__name__}"
        )
    checkpointing_kwargs = validate_checkpointing_kwargs(checkpointing_kwargs)
    if checkpointing == "on":  # the CLI's word for True; the presets and the FSDP policy test True/None
        checkpointing = True
    unique = list(iter_unique_parameters(model))
    if not unique:
        raise NoParametersError(f"{type(model).__name__} has no parameters; there is nothing to prepare")
    reg = registry or default_registry()
    with module_index_scope(model):  # the detectors, the declarations and the steps below share one index
        sel = selection or reg.select(model, backend, allow_mismatch=allow_mismatch)
        decls = [reg.declare(info, model, det) for info, det in sel.detections]
        decl = merge_declarations(decls)
        fsdp_setting = detect_fsdp(fsdp, model=model)
        choices = resolve_choices(decl, fsdp_setting, upcast, checkpointing, memory, peft_compat=peft_compat)
        body = anatomy(model)  # the model's parts, found once for the whole plan
        ckpt = plan_checkpointing(
            model, body, choices, decl, checkpointing, checkpointing_kwargs, peft_compat=peft_compat
        )
        params = plan_parameters(unique, decl, choices, body.adapters, peft_compat=peft_compat)
        params += plan_quantized_buffers(model, decl)
    require_something_to_train(model, unique, sel)
    notes = [*decl.notes, *ckpt.notes, *mixed_precision_notes(params, choices.policy_label)]
    fsdp_info: dict[str, Any] | None = None
    if fsdp_setting.enabled:
        fsdp_notes, fsdp_info = plan_fsdp(model, params, decls, fsdp_setting, choices, peft_compat=peft_compat)
    input_hooks = plan_input_grads_hooks(body, ckpt, decl, peft_compat=peft_compat)
    notes += input_hooks.notes
    memory_extras: dict[str, Any] = {}
    if choices.modes is not None:
        memory_extras, memory_notes = memory_plan(choices.modes, model, ckpt.mode)
        notes += memory_notes
    if fsdp_setting.enabled:
        notes += fsdp_notes
    if body.peft_wrapped:
        notes.append("PEFT-wrapped model: adapter parameters keep their requires_grad; only the base is frozen")
    use_cache_off = plan_use_cache_off(body, ckpt.mode, peft_compat=peft_compat)
    if use_cache_off:
        notes.append(f"use_cache turned off (no KV cache in training) on: {', '.join(use_cache_off)}")
    master_weights = plan_master_weights(params, peft_compat=peft_compat)
    if master_weights:
        notes.append(MASTER_WEIGHTS_NOTE)
    backend_warnings = raise_backend_warnings(decls)
    notes += [f"warning: {w}" for w in backend_warnings]
    log.debug(
        "plan for %s: backend %s, upcast %s (%d params), checkpointing %s (%s), %d notes",
        type(model).__name__, sel.primary.name, choices.policy_label, sum(p.upcast for p in params), ckpt.mode.value,
        ckpt.note, len(notes),
    )  # fmt: skip
    return Plan(
        model_type=class_path(model),
        backend=sel.primary.name,
        backends=tuple(info.name for info, _ in sel.detections),
        distributions=tuple(info.distribution for info, _ in sel.detections),
        evidence=evidence_lines(sel),
        forced=sel.forced,
        upcast_policy=choices.policy_label,
        params=tuple(params),
        checkpointing=ckpt.mode,
        checkpointing_note=ckpt.note,
        checkpointing_kwargs=ckpt.kwargs,
        hooks=input_hooks.lines,
        input_grads_hooks=input_hooks.sites,
        fixups=decl.fixups,
        notes=tuple(notes),
        trainable=decl.trainable,
        not_trainable_reason=decl.not_trainable_reason,
        declarations=tuple(decls),
        fingerprint=model_fingerprint(model),
        memory=memory_extras.get("memory"),
        fsdp=fsdp_info,
        use_cache_off=use_cache_off,
        warnings=backend_warnings,
        master_weights=master_weights,
    )


# --------------------------------------------------------------------------- the steps


def resolve_choices(
    decl: Declarations,
    fsdp_setting: FsdpSetting,
    upcast: UpcastPolicy,
    checkpointing: bool | str | CheckpointMode | None,
    memory: MemoryChoice,
    *,
    peft_compat: bool,
) -> Choices:
    """The upcast policy and checkpointing mode: the caller's, adjusted for FSDP and the memory preset,
    resolved against what the backend declares (or PEFT's rules with ``peft_compat``)."""
    fsdp_notes: list[str] = []
    fsdp_mode_note: str | None = None
    if fsdp_setting.enabled and not peft_compat:
        upcast, checkpointing, fsdp_notes, fsdp_mode_note = fsdp_choices(fsdp_setting, decl, upcast, checkpointing)
    elif fsdp_setting.enabled:
        fsdp_notes.append(
            f"FSDP detected ({fsdp_setting.source}) but the drop-in follows PEFT's rules (fp32 upcast), which FSDP1 "
            "cannot flatten; use kbitprep.prepare(model, fsdp=True)"
        )
    if peft_compat:
        policy_label = "peft" if upcast == "all" else "none"
        mode = CheckpointMode(checkpointing) if isinstance(checkpointing, str) else CheckpointMode.OFF
        upcast_all = policy_label == "peft"
        return Choices(
            policy_label,
            lambda n, p, m: upcast_all,
            mode,
            "PEFT's rule (prepare_model_for_kbit_training)",
            None,
            tuple(fsdp_notes),
            fsdp_mode_note,
        )
    modes = resolve_memory(memory)
    upcast, checkpointing = preset_options(modes, upcast, checkpointing, decl.checkpointing)
    policy_label, wants = resolve_upcast(upcast, decl)
    mode, mode_note = resolve_checkpointing(checkpointing, decl)
    return Choices(policy_label, wants, mode, fsdp_mode_note or mode_note, modes, tuple(fsdp_notes), fsdp_mode_note)


def plan_checkpointing(
    model: nn.Module,
    body: Anatomy,
    choices: Choices,
    decl: Declarations,
    asked: bool | str | CheckpointMode | None,
    checkpointing_kwargs: Mapping[str, Any] | None,
    *,
    peft_compat: bool,
) -> Checkpointing:
    """The checkpointing to enable, given the model's API and any checkpointing already on it: kept as
    the user set it where they left the default, replaced (with a note) otherwise."""
    notes: list[str] = []
    mode, mode_note = choices.mode, choices.mode_note
    target = body.target
    if mode is not CheckpointMode.OFF and target is None:
        notes.append(f"{type(model).__name__} has no gradient_checkpointing_enable(); checkpointing stays off")
        mode, mode_note = CheckpointMode.OFF, "the model has no checkpointing API"
    existing = body.existing
    keep_existing = False
    if existing is not None and mode is CheckpointMode.OFF:
        notes.append(
            f"checkpointing was already enabled on the model ({existing.describe()}); "
            "prepare leaves it as it is (call model.gradient_checkpointing_disable() to turn it off)"
        )
    elif existing is not None and not peft_compat:
        theirs = CheckpointMode.REENTRANT if existing.use_reentrant else CheckpointMode.NON_REENTRANT
        left_default = asked is None or asked is True
        if left_default and not checkpointing_kwargs and not choices.fsdp_mode_note and theirs in decl.checkpointing:
            keep_existing = True
            mode, mode_note = theirs, f"already enabled on the model ({existing.describe()}): kept"
    kwargs: dict[str, Any] = dict(checkpointing_kwargs or {})
    if existing is not None and mode is not CheckpointMode.OFF and not peft_compat:
        kwargs = {**existing.kwargs, **kwargs}  # the user's other settings survive
    if mode is not CheckpointMode.OFF:
        kwargs["use_reentrant"] = mode is CheckpointMode.REENTRANT
    if keep_existing and existing is not None:
        kwargs = dict(existing.kwargs)  # kept exactly as the user set it: prepare leaves it alone
    replacing = existing is not None and mode is not CheckpointMode.OFF and not keep_existing
    if replacing and existing is not None and dict(existing.kwargs) != kwargs:
        notes.append(
            f"checkpointing already enabled on the model ({existing.describe()}) will be replaced by "
            f"{', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))} ({mode_note}); "
            "prepare warns (CheckpointingOverrideWarning)"
        )
    return Checkpointing(mode, mode_note, kwargs, keep_existing, tuple(notes))


def plan_parameters(
    unique: list[tuple[str, list[str], nn.Parameter, nn.Module]],
    decl: Declarations,
    choices: Choices,
    adapters: AbstractSet[int],
    *,
    peft_compat: bool,
) -> list[ParamPlan]:
    """One :class:`ParamPlan` a parameter: frozen unless an adapter, cast to fp32 where eligible and wanted,
    quantized storage never cast. With ``peft_compat``, PEFT's rule decides what is cast."""
    # PEFT casts every fp16/bf16 parameter it can (see _peft_rules.peft_casts), tensor subclasses included:
    # some subclasses cast (only their scales change), others raise. Try each subclass cast, as PEFT would.
    subclass_casts = _peft_subclass_casts(unique) if peft_compat else {}
    peft_would_crash = any(after is None for after in subclass_casts.values())
    params: list[ParamPlan] = []
    for name, aliases, p, owner in unique:
        quantized = any(a in decl.quantized for a in aliases)
        adapter = id(p) in adapters
        plain = is_plain_tensor(p)
        if peft_compat:  # PEFT's rule; where PEFT would crash, the backend's allow_upcast decides
            castable = plain or subclass_casts.get(id(p)) is not None
            eligible = (castable and not adapter and peft_casts(p)) and (decl.allow_upcast or not peft_would_crash)
        else:
            eligible = plain and not quantized and not adapter and p.dtype in HALF_DTYPES and decl.allow_upcast
        dtype_after = torch.float32 if eligible and choices.wants(name, p, owner) else p.dtype
        before = tensor_nbytes(p)
        after = before if dtype_after == p.dtype else p.numel() * torch.empty((), dtype=dtype_after).element_size()
        if dtype_after != p.dtype and not plain:
            after = subclass_casts[id(p)] or before
        params.append(
            ParamPlan(
                name=name,
                aliases=tuple(aliases),
                module_type=type(owner).__name__,
                shape=tuple(p.shape),
                dtype_before=p.dtype,
                dtype_after=dtype_after,
                requires_grad_before=p.requires_grad,
                requires_grad_after=p.requires_grad if adapter else False,
                bytes_before=before,
                bytes_after=after,
                quantized=quantized,
                adapter=adapter,
            )
        )
    return params


def plan_quantized_buffers(model: nn.Module, decl: Declarations) -> list[ParamPlan]:
    """Buffers a backend declares quantized storage (GPTQ's int32 qweight, a library keeping its int8
    weights and scales in buffers), counted too: protected, never frozen or cast."""
    seen: set[int] = set()
    out: list[ParamPlan] = []
    for mname, owner in module_index(model).items():  # the plan's index: no walk of its own
        for local, buf in owner.named_buffers(recurse=False):
            if id(buf) in seen:  # a shared buffer counts once, under its first name (as named_buffers() does)
                continue
            seen.add(id(buf))
            bname = f"{mname}.{local}" if mname else local
            if bname in decl.quantized:
                out.append(_quantized_buffer(bname, buf, owner))
    return out


def _quantized_buffer(bname: str, buf: torch.Tensor, owner: nn.Module) -> ParamPlan:
    nbytes = tensor_nbytes(buf)
    return ParamPlan(
        name=bname,
        aliases=(bname,),
        module_type=type(owner).__name__,
        shape=tuple(buf.shape),
        dtype_before=buf.dtype,
        dtype_after=buf.dtype,
        requires_grad_before=False,
        requires_grad_after=False,
        bytes_before=nbytes,
        bytes_after=nbytes,
        quantized=True,
    )


def require_something_to_train(
    model: nn.Module, unique: list[tuple[str, list[str], nn.Parameter, nn.Module]], sel: Selection
) -> None:
    """Raise :class:`~kbitprep.errors.NoParametersError` for a model with no plain floating-point
    parameter and no quantized layer a backend recognises."""
    any_float = any(is_plain_tensor(p) and p.dtype.is_floating_point for _, _, p, _ in unique)
    if not any_float and not any(det.modules for _, det in sel.detections):
        raise NoParametersError(
            f"{type(model).__name__} has no floating-point parameters and no quantized layers a backend "
            "recognises; there is nothing to train"
        )


def mixed_precision_notes(params: list[ParamPlan], policy_label: str) -> list[str]:
    """A note when the upcast leaves fp32 and half-precision layers side by side (train under autocast)."""
    upcast_mixed = any(p.upcast for p in params) and any(
        not p.upcast and not p.quantized and p.dtype_before in HALF_DTYPES for p in params
    )
    if not upcast_mixed:
        return []
    return [
        f"upcast {policy_label!r} leaves fp32 and half-precision layers side by side: train under "
        "torch.autocast (bf16/fp16 mixed precision), or fp32 outputs will meet half-precision weights"
    ]


def plan_fsdp(
    model: nn.Module,
    params: list[ParamPlan],
    decls: list[Declarations],
    setting: FsdpSetting,
    choices: Choices,
    *,
    peft_compat: bool,
) -> tuple[list[str], dict[str, Any]]:
    """The FSDP notes and the plan's ``fsdp`` entry: the setting and the dtypes it checked."""
    notes = list(choices.fsdp_notes)
    extras: dict[str, Any] = {}
    if not peft_compat:
        storage = next((d.sharded_storage for d in decls if d.sharded_storage is not None), None)
        more, extras = check_fsdp_dtypes(model, params, setting, upcast_label=choices.policy_label, storage=storage)
        notes.extend(more)
    return notes, {**setting.to_dict(), **extras}


@dataclass(frozen=True)
class InputGradsHooks:
    """The input-require-grads hooks of a plan.

    Attributes:
        lines: what the plan shows (``Plan.hooks``), one line per hooked module or stack.
        notes: notes for the plan (reentrant checkpointing with nothing to hook).
        sites: qualified names of the modules kbitprep hooks itself (``Plan.input_grads_hooks``):
            input embeddings (a forward hook) and checkpointed layers (a forward pre-hook).
    """

    lines: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmbeddingHook:
    """One input-embedding module that carries an input-require-grads hook once prepared.

    Attributes:
        name: its qualified name.
        module: the module.
        by: ``"present"`` (already there), ``"transformers"`` (registered when checkpointing is
            enabled) or ``"kbitprep"``.
    """

    name: str
    module: nn.Module
    by: str


def plan_input_grads_hooks(
    body: Anatomy, ckpt: Checkpointing, decl: Declarations, *, peft_compat: bool = False
) -> InputGradsHooks:
    """Every input-require-grads hook that reentrant checkpointing needs, so that every checkpointed
    stack receives inputs that require grad: on input embeddings (:func:`plan_embedding_hooks`), and on the
    layers of each stack no hooked embedding feeds (:func:`plan_stack_hooks`; a speech encoder, a vision
    tower). A note where reentrant checkpointing has nothing to hook."""
    if ckpt.mode is CheckpointMode.OFF:
        return InputGradsHooks()
    embedding_hooks = plan_embedding_hooks(body, ckpt, decl, peft_compat=peft_compat)
    stack_lines, stack_sites = plan_stack_hooks(body, ckpt, decl, embedding_hooks, peft_compat=peft_compat)
    lines = [_embedding_hook_line(h) for h in embedding_hooks] + stack_lines
    notes: list[str] = []
    needs = ckpt.mode is CheckpointMode.REENTRANT and decl.input_grads_hook
    if needs and not embedding_hooks and not stack_sites:
        notes.append("reentrant checkpointing without input embeddings: gradients may not reach adapters")
    sites = [h.name for h in embedding_hooks if h.by == "kbitprep"] + stack_sites
    return InputGradsHooks(tuple(lines), tuple(notes), tuple(sites))


def _embedding_hook_line(hook: EmbeddingHook) -> str:
    if hook.by == "present":
        return f"input-require-grads hook on {hook.name}: already present, not added again"
    if hook.by == "transformers":
        return f"input-require-grads hook on {hook.name} (registered by transformers with checkpointing)"
    return f"input-require-grads hook on {hook.name} (kbitprep)"


def plan_embedding_hooks(
    body: Anatomy, ckpt: Checkpointing, decl: Declarations, *, peft_compat: bool = False
) -> list[EmbeddingHook]:
    """The input embeddings that carry an input-require-grads hook once prepared: one already there (on
    the token embeddings or on a stack's input embeddings), transformers' (its ``enable_input_require_grads``
    hooks the input embeddings of every sub-model when checkpointing is enabled on a model whose main input
    is ``input_ids``), or kbitprep's where reentrant checkpointing needs one: on the token embeddings, or
    with ``peft_compat`` where PEFT's function puts them (the input embeddings of every sub-model, as
    transformers does)."""
    if ckpt.mode is CheckpointMode.OFF:
        return []
    needs = ckpt.mode is CheckpointMode.REENTRANT and decl.input_grads_hook
    target = body.target
    by_transformers = (
        target is not None
        and not ckpt.keep_existing
        and hasattr(type(target), "_activation_checkpointing_enable")
        and (getattr(target, "main_input_name", "") == "input_ids" or getattr(target, "_hf_peft_config_loaded", False))
    )
    candidates = list(body.submodel_embeddings) if (by_transformers or peft_compat) else []
    if body.embeddings is not None and all(m is not body.embeddings for _, m in candidates):
        candidates.insert(0, (body.embeddings_name, body.embeddings))  # the token embeddings, always
    listed = {id(m) for _, m in candidates}
    for stack in body.stacks:  # a stack's input embeddings that already carry a hook (a user's): shown too
        emb = stack.embeddings
        if emb is not None and id(emb) not in listed and count_input_grad_hooks(emb):
            candidates.append((stack.embeddings_name, emb))
            listed.add(id(emb))
    found: list[EmbeddingHook] = []
    for name, mod in candidates:
        if count_input_grad_hooks(mod):
            found.append(EmbeddingHook(name, mod, "present"))
        elif by_transformers:
            found.append(EmbeddingHook(name, mod, "transformers"))
        elif needs:
            found.append(EmbeddingHook(name, mod, "kbitprep"))
    return found


def plan_stack_hooks(
    body: Anatomy,
    ckpt: Checkpointing,
    decl: Declarations,
    embedding_hooks: list[EmbeddingHook],
    *,
    peft_compat: bool = False,
) -> tuple[list[str], list[str]]:
    """Forward pre-hooks on the layers of every checkpointed stack whose input does not come through hooked
    input embeddings (a Whisper or wav2vec2 encoder, a vision tower whose patch embedding nothing hooks):
    with reentrant checkpointing, such a stack's parameters (LoRA included) would get no gradient. Each
    pre-hook makes the layer's hidden-state input require grad. Returns the plan's lines and the layers'
    qualified names. Nothing with ``peft_compat`` (PEFT hooks only input embeddings), with non-reentrant
    checkpointing (which needs no hook), or when the backend declares no input hook is needed."""
    if peft_compat or ckpt.mode is not CheckpointMode.REENTRANT or not decl.input_grads_hook:
        return [], []
    hooked = {id(h.module) for h in embedding_hooks}
    lines: list[str] = []
    sites: list[str] = []
    for stack in body.stacks:
        emb = stack.embeddings
        if emb is not None and (id(emb) in hooked or count_input_grad_hooks(emb)):
            continue  # fed through hooked embeddings (the token embeddings, or a tower's hooked patch embedding)
        lines.append(_stack_hook_line(stack))
        sites += [name for name, layer in stack.layers if not count_layer_input_hooks(layer)]
    return lines, sites


def _stack_hook_line(stack: Stack) -> str:
    n = len(stack.layers)
    origin = f"starts from {stack.main_input}" if stack.main_input else "does not start from hooked embeddings"
    if stack.embeddings_name:
        origin += f", through {stack.embeddings_name}, which carries no hook"
    if all(count_layer_input_hooks(layer) for _, layer in stack.layers):
        return f"input-require-grads pre-hooks on the checkpointed layers of {stack.name}: already present"
    return (
        f"input-require-grads pre-hook on {'each of ' if n > 1 else ''}the {n} checkpointed "
        f"layer{'s' if n > 1 else ''} of {stack.name} ({stack.layer_class}): the stack {origin} (kbitprep)"
    )


def plan_use_cache_off(body: Anatomy, mode: CheckpointMode, *, peft_compat: bool) -> tuple[str, ...]:
    """The configs (class names) whose ``use_cache`` prepare turns off: all with it on, when checkpointing."""
    if mode is CheckpointMode.OFF or peft_compat:
        return ()
    return tuple(type(c).__name__ for c in body.configs if getattr(c, "use_cache", None))


def plan_master_weights(params: list[ParamPlan], *, peft_compat: bool) -> bool:
    """Whether prepare installs fp32 master weights for parameters trained after prepare: wherever a
    half-precision plain parameter stays half precision (the drop-in upcasts as PEFT does instead)."""
    return not peft_compat and any(
        not p.quantized and p.dtype_after in HALF_DTYPES and p.dtype_before in HALF_DTYPES for p in params
    )


def raise_backend_warnings(decls: list[Declarations]) -> tuple[str, ...]:
    """The backends' warnings, each raised as :class:`~kbitprep.errors.BackendWarning`."""
    found = tuple(w for d in decls for w in d.warnings)
    for w in found:
        warnings.warn(f"kbitprep: {w}", BackendWarning, stacklevel=4)
    return found


def evidence_lines(sel: Selection) -> tuple[str, ...]:
    """Each backend's evidence, prefixed by the backend's name when several backends claim the model."""
    several = len(sel.detections) > 1
    return tuple((f"[{info.name}] {e}" if several else e) for info, det in sel.detections for e in det.evidence)


def _peft_subclass_casts(unique: list[tuple[str, list[str], nn.Parameter, nn.Module]]) -> dict[int, int | None]:
    """For each fp16/bf16 tensor-subclass parameter PEFT's function would cast: the bytes after the
    cast, or ``None`` where the cast raises (PEFT's function then crashes). The model is not changed:
    each cast makes a temporary copy, one tensor at a time."""
    out: dict[int, int | None] = {}
    for _, _, p, _ in unique:
        if is_plain_tensor(p) or not peft_casts(p):
            continue
        try:
            with torch.no_grad():
                cast_copy = p.data.to(torch.float32)
        except Exception:
            out[id(p)] = None
            continue
        out[id(p)] = tensor_nbytes(cast_copy)
        del cast_copy
    return out


def check_plan_matches(plan: Plan, model: nn.Module) -> None:
    """Raise :class:`~kbitprep.errors.PlanMismatchError` unless ``plan`` was made for ``model`` as it is now."""
    now = model_fingerprint(model)
    if plan.fingerprint == now:
        return
    if not plan.fingerprint or plan.fingerprint[0] != now[0]:
        raise PlanMismatchError(
            f"this plan was made for another model (a {plan.model_type}), not this {type(model).__name__}; "
            "call kbitprep.plan(model) on the model you prepare"
        )
    then = {name: (shape, dtype) for name, shape, dtype in plan.fingerprint[1]}
    current = {name: (shape, dtype) for name, shape, dtype in now[1]}
    changed = [n for n in current if n in then and current[n] != then[n]]
    added = [n for n in current if n not in then]
    removed = [n for n in then if n not in current]
    parts = []
    for n in changed[:3]:
        (s0, d0), (s1, d1) = then[n], current[n]
        what = f"dtype {d0} -> {d1}" if s0 == s1 else f"shape {list(s0)} -> {list(s1)}"
        parts.append(f"parameter {n!r} changed ({what})")
    parts += [f"parameter {n!r} was added" for n in added[:3]]
    parts += [f"parameter {n!r} was removed" for n in removed[:3]]
    more = len(changed) + len(added) + len(removed) - len(parts)
    detail = "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
    raise PlanMismatchError(f"the model changed since it was planned: {detail}; call kbitprep.plan(model) again")
