"""Building a :class:`Plan`: what prepare would do to a model, computed without changing it."""

from __future__ import annotations

import json
import logging
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._anatomy import anatomy, count_input_grad_hooks
from ._fsdp import check_fsdp_dtypes, detect_fsdp, fsdp_choices
from ._memory import MemoryChoice, memory_plan, preset_options, resolve_memory
from ._peft_rules import peft_casts
from ._policies import UpcastPolicy, resolve_checkpointing, resolve_upcast, validate_checkpointing_kwargs
from ._registry import Registry, Selection, default_registry
from ._tensors import iter_unique_parameters, tensor_nbytes
from .errors import BackendWarning, NoParametersError, NotAModuleError, PlanMismatchError
from .plugin import HALF_DTYPES, CheckpointMode, Declarations, FixUp, class_path, is_plain_tensor

log = logging.getLogger(__name__)

__all__ = ["ParamPlan", "Plan", "build_plan", "check_plan_matches", "model_fingerprint"]


@dataclass(frozen=True)
class ParamPlan:
    """What happens to one parameter, or to a buffer a backend declares quantized storage (tied
    parameters appear once, with every name in ``aliases``)."""

    name: str
    aliases: tuple[str, ...]
    module_type: str
    shape: tuple[int, ...]
    dtype_before: torch.dtype
    dtype_after: torch.dtype
    requires_grad_before: bool
    requires_grad_after: bool
    bytes_before: int
    bytes_after: int
    quantized: bool
    adapter: bool = False

    @property
    def frozen(self) -> bool:
        """Whether prepare turns ``requires_grad`` off."""
        return self.requires_grad_before and not self.requires_grad_after

    @property
    def upcast(self) -> bool:
        """Whether prepare casts it to another dtype."""
        return self.dtype_before != self.dtype_after

    @property
    def byte_delta(self) -> int:
        """Bytes added (positive) or saved (negative) by prepare."""
        return self.bytes_after - self.bytes_before

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "module_type": self.module_type,
            "shape": list(self.shape),
            "dtype_before": str(self.dtype_before).removeprefix("torch."),
            "dtype_after": str(self.dtype_after).removeprefix("torch."),
            "requires_grad_before": self.requires_grad_before,
            "requires_grad_after": self.requires_grad_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "quantized": self.quantized,
            "adapter": self.adapter,
        }


@dataclass(frozen=True)
class Plan:
    """What :func:`kbitprep.prepare` will do to one model. Building it changes nothing.

    Print it for a readable table; :meth:`to_dict` gives JSON-ready data. Pass it to
    ``prepare(model, plan=plan)`` to apply exactly this plan.
    """

    model_type: str
    backend: str
    backends: tuple[str, ...]
    distributions: tuple[str, ...]
    evidence: tuple[str, ...]
    forced: bool
    upcast_policy: str
    params: tuple[ParamPlan, ...]
    checkpointing: CheckpointMode
    checkpointing_note: str
    checkpointing_kwargs: Mapping[str, Any]
    hooks: tuple[str, ...]
    fixups: tuple[FixUp, ...]
    notes: tuple[str, ...]
    trainable: bool
    not_trainable_reason: str
    declarations: tuple[Declarations, ...] = field(repr=False, compare=False)
    fingerprint: tuple[Any, ...] = field(repr=False, compare=False, default=())
    #: The memory modes prepare installs (chunked head, offload: see ``kbitprep._memory``), or ``None``.
    memory: Mapping[str, Any] | None = None
    #: The FSDP setting and the dtypes it checked (see ``kbitprep._fsdp``), or ``None`` without FSDP.
    fsdp: Mapping[str, Any] | None = None
    #: Config objects (class names) whose ``use_cache`` prepare turns off: the top-level config and
    #: sub-configs such as T5's decoder config or LLaVA's ``text_config``. Empty for the drop-in,
    #: which leaves ``use_cache`` alone as PEFT does.
    use_cache_off: tuple[str, ...] = ()
    #: Backend warnings (:attr:`kbitprep.plugin.Declarations.warnings`), also raised as
    #: :class:`~kbitprep.errors.BackendWarning` when the plan is made.
    warnings: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling keeps everything but the model reference: an unpickled plan is for no model
        (``prepare(model, plan=...)`` then raises :class:`~kbitprep.errors.PlanMismatchError`)."""
        return {**self.__dict__, "fingerprint": ()}

    @property
    def extras(self) -> dict[str, Any]:
        """``{"memory": ..., "fsdp": ...}`` for the parts that are set (the older spelling of both fields)."""
        return {k: v for k, v in (("memory", self.memory), ("fsdp", self.fsdp)) if v is not None}

    # ----------------------------------------------------------------- totals
    @property
    def to_freeze(self) -> tuple[ParamPlan, ...]:
        """Parameters whose ``requires_grad`` prepare turns off."""
        return tuple(p for p in self.params if p.frozen)

    @property
    def to_upcast(self) -> tuple[ParamPlan, ...]:
        """Parameters prepare casts to fp32."""
        return tuple(p for p in self.params if p.upcast)

    @property
    def quantized(self) -> tuple[ParamPlan, ...]:
        """Parameters that hold quantized storage (never cast)."""
        return tuple(p for p in self.params if p.quantized)

    @property
    def bytes_before(self) -> int:
        """Parameter bytes before prepare (each tied parameter counted once)."""
        return sum(p.bytes_before for p in self.params)

    @property
    def bytes_after(self) -> int:
        """Parameter bytes after prepare."""
        return sum(p.bytes_after for p in self.params)

    @property
    def byte_delta(self) -> int:
        """Parameter bytes added by prepare (negative when saved)."""
        return self.bytes_after - self.bytes_before

    def by_module_type(self) -> dict[str, dict[str, int]]:
        """Counts and bytes grouped by owning module class: params, frozen, upcast, bytes before/after."""
        groups: dict[str, dict[str, int]] = defaultdict(
            lambda: {"params": 0, "frozen": 0, "upcast": 0, "quantized": 0, "bytes_before": 0, "bytes_after": 0}
        )
        for p in self.params:
            g = groups[p.module_type]
            g["params"] += 1
            g["frozen"] += int(p.frozen)
            g["upcast"] += int(p.upcast)
            g["quantized"] += int(p.quantized)
            g["bytes_before"] += p.bytes_before
            g["bytes_after"] += p.bytes_after
        return dict(groups)

    def to_dict(self, *, params: bool = True) -> dict[str, Any]:
        """A JSON-ready dict (stable keys). ``params=False`` leaves the per-parameter list out."""
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "backend": self.backend,
            "backends": list(self.backends),
            "distributions": list(self.distributions),
            "evidence": list(self.evidence),
            "forced": self.forced,
            "trainable": self.trainable,
            "not_trainable_reason": self.not_trainable_reason,
            "upcast_policy": self.upcast_policy,
            "checkpointing": self.checkpointing.value,
            "checkpointing_note": self.checkpointing_note,
            "checkpointing_kwargs": dict(self.checkpointing_kwargs),
            "hooks": list(self.hooks),
            "fixups": [{"name": f.name, "description": f.description} for f in self.fixups],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "use_cache_off": list(self.use_cache_off),
            "totals": {
                "params": len(self.params),
                "frozen": len(self.to_freeze),
                "upcast": len(self.to_upcast),
                "quantized": len(self.quantized),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "byte_delta": self.byte_delta,
            },
            "by_module_type": self.by_module_type(),
            "extras": {k: v for k, v in self.extras.items() if _jsonable(v)},
        }
        if params:
            out["params"] = [p.to_dict() for p in self.params]
        return out

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, **kwargs)

    def __str__(self) -> str:
        from ._render import render_plan

        return render_plan(self)

    def __repr__(self) -> str:
        """One line: backend, model class, counts and the byte change (``print(plan)`` for the table)."""
        return (
            f"<Plan {self.backend} for {self.model_type.rsplit('.', 1)[-1]}: {len(self.params)} params, "
            f"freeze {len(self.to_freeze)}, upcast {len(self.to_upcast)}, quantized {len(self.quantized)}, "
            f"{self.byte_delta:+,} bytes, checkpointing {self.checkpointing.value}>"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython / Jupyter text display: the plan table."""
        printer.text(repr(self) if cycle else str(self))

    def _repr_html_(self) -> str:
        """Jupyter display: a compact HTML table."""
        from ._html import plan_html

        return plan_html(self)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- model facts


def model_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """Identity and shape of a model's parameters, to check a plan is applied to the model it was made for.

    The identity is a weak reference (an ``id`` could be reused by another model once the first is gone).
    """
    return (weakref.ref(model), tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()))


def _merge(decls: list[Declarations]) -> Declarations:
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
    sel = selection or reg.select(model, backend, allow_mismatch=allow_mismatch)
    decls = [reg.declare(info, model, det) for info, det in sel.detections]
    decl = _merge(decls)
    fsdp_setting = detect_fsdp(fsdp, model=model)
    fsdp_notes: list[str] = []
    fsdp_ckpt_note: str | None = None
    if fsdp_setting.enabled and not peft_compat:
        upcast, checkpointing, fsdp_notes, fsdp_ckpt_note = fsdp_choices(fsdp_setting, decl, upcast, checkpointing)
    elif fsdp_setting.enabled:
        fsdp_notes.append(
            f"FSDP detected ({fsdp_setting.source}) but the drop-in follows PEFT's rules (fp32 upcast), which FSDP1 "
            "cannot flatten; use kbitprep.prepare(model, fsdp=True)"
        )

    if peft_compat:
        policy_label = "peft" if upcast == "all" else "none"
        peft_mode = CheckpointMode(checkpointing) if isinstance(checkpointing, str) else CheckpointMode.OFF
        mode, mode_note = peft_mode, "PEFT's rule (prepare_model_for_kbit_training)"
        upcast_all = policy_label == "peft"
        wants: Callable[[str, torch.Tensor, nn.Module], bool] = lambda n, p, m: upcast_all  # noqa: E731
    else:
        modes = resolve_memory(memory)
        upcast, checkpointing = preset_options(modes, upcast, checkpointing, decl.checkpointing)
        policy_label, wants = resolve_upcast(upcast, decl)
        mode, mode_note = resolve_checkpointing(checkpointing, decl)
        mode_note = fsdp_ckpt_note or mode_note
    notes = list(decl.notes)
    body = anatomy(model)  # the model's parts, found once for the whole plan
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
        left_default = checkpointing is None or checkpointing is True
        if left_default and not checkpointing_kwargs and not fsdp_ckpt_note and theirs in decl.checkpointing:
            keep_existing = True
            mode, mode_note = theirs, f"already enabled on the model ({existing.describe()}): kept"

    adapters = body.adapters
    # PEFT casts every fp16/bf16 parameter it can (see _peft_rules.peft_casts), tensor subclasses included:
    # some subclasses cast (only their scales change), others raise. Try each subclass cast, as PEFT would.
    subclass_casts = _peft_subclass_casts(unique) if peft_compat else {}
    peft_would_crash = any(after is None for after in subclass_casts.values())
    params: list[ParamPlan] = []
    any_float = False
    for name, aliases, p, owner in unique:
        quantized = any(a in decl.quantized for a in aliases)
        adapter = id(p) in adapters
        plain = is_plain_tensor(p)
        any_float = any_float or (plain and p.dtype.is_floating_point)
        if peft_compat:  # PEFT's rule; where PEFT would crash, the backend's allow_upcast decides
            castable = plain or subclass_casts.get(id(p)) is not None
            eligible = (castable and not adapter and peft_casts(p)) and (decl.allow_upcast or not peft_would_crash)
        else:
            eligible = plain and not quantized and not adapter and p.dtype in HALF_DTYPES and decl.allow_upcast
        dtype_after = torch.float32 if eligible and wants(name, p, owner) else p.dtype
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
    # Buffers a backend declares quantized storage (GPTQ's int32 qweight, a library keeping its int8
    # weights and scales in buffers) are counted too: protected, never frozen or cast.
    owners = dict(model.named_modules())
    seen_buffers: set[int] = set()
    for bname, buf in model.named_buffers():
        if bname not in decl.quantized or id(buf) in seen_buffers:
            continue
        seen_buffers.add(id(buf))
        nbytes = tensor_nbytes(buf)
        params.append(
            ParamPlan(
                name=bname,
                aliases=(bname,),
                module_type=type(owners[bname.rpartition(".")[0]]).__name__,
                shape=tuple(buf.shape),
                dtype_before=buf.dtype,
                dtype_after=buf.dtype,
                requires_grad_before=False,
                requires_grad_after=False,
                bytes_before=nbytes,
                bytes_after=nbytes,
                quantized=True,
            )
        )
    if not any_float and not any(det.modules for _, det in sel.detections):
        raise NoParametersError(
            f"{type(model).__name__} has no floating-point parameters and no quantized layers a backend "
            "recognises; there is nothing to train"
        )
    upcast_mixed = any(p.upcast for p in params) and any(
        not p.upcast and not p.quantized and p.dtype_before in HALF_DTYPES for p in params
    )
    if upcast_mixed:
        notes.append(
            f"upcast {policy_label!r} leaves fp32 and half-precision layers side by side: train under "
            "torch.autocast (bf16/fp16 mixed precision), or fp32 outputs will meet half-precision weights"
        )
    fsdp_extras: dict[str, Any] = {}
    if fsdp_setting.enabled and not peft_compat:
        storage = next((d.sharded_storage for d in decls if d.sharded_storage is not None), None)
        more, fsdp_extras = check_fsdp_dtypes(model, params, fsdp_setting, upcast_label=policy_label, storage=storage)
        fsdp_notes.extend(more)

    use_reentrant = mode is CheckpointMode.REENTRANT
    ckpt_kwargs: dict[str, Any] = dict(checkpointing_kwargs or {})
    if existing is not None and mode is not CheckpointMode.OFF and not peft_compat:
        ckpt_kwargs = {**existing.kwargs, **ckpt_kwargs}  # the user's other settings survive
    if mode is not CheckpointMode.OFF:
        ckpt_kwargs["use_reentrant"] = use_reentrant
    if keep_existing and existing is not None:
        ckpt_kwargs = dict(existing.kwargs)  # kept exactly as the user set it: prepare leaves it alone
    replacing = existing is not None and mode is not CheckpointMode.OFF and not keep_existing
    if replacing and existing is not None and dict(existing.kwargs) != ckpt_kwargs:
        notes.append(
            f"checkpointing already enabled on the model ({existing.describe()}) will be replaced by "
            f"{', '.join(f'{k}={v!r}' for k, v in sorted(ckpt_kwargs.items()))} ({mode_note}); "
            "prepare warns (CheckpointingOverrideWarning)"
        )

    hooks: list[str] = []
    if mode is not CheckpointMode.OFF:
        emb = body.embeddings
        emb_name = body.embeddings_name
        if emb is not None and count_input_grad_hooks(emb):
            hooks.append(f"input-require-grads hook on {emb_name}: already present, not added again")
        elif (
            emb is not None
            and target is not None
            and not keep_existing
            and hasattr(type(target), "_activation_checkpointing_enable")
            and (getattr(target, "main_input_name", "") == "input_ids")
        ):
            hooks.append(f"input-require-grads hook on {emb_name} (registered by transformers with checkpointing)")
        elif emb is not None and use_reentrant and decl.input_grads_hook:
            hooks.append(f"input-require-grads hook on {emb_name} (kbitprep)")
        elif use_reentrant and decl.input_grads_hook:
            notes.append("reentrant checkpointing without input embeddings: gradients may not reach adapters")

    memory_extras: dict[str, Any] = {}
    if not peft_compat:
        memory_extras, memory_notes = memory_plan(modes, model, mode)
        notes.extend(memory_notes)

    if fsdp_setting.enabled:
        notes.extend(fsdp_notes)
        fsdp_info: dict[str, Any] | None = {**fsdp_setting.to_dict(), **fsdp_extras}
    else:
        fsdp_info = None

    if body.peft_wrapped:
        notes.append("PEFT-wrapped model: adapter parameters keep their requires_grad; only the base is frozen")

    use_cache_off: tuple[str, ...] = ()
    if mode is not CheckpointMode.OFF and not peft_compat:
        use_cache_off = tuple(type(c).__name__ for c in body.configs if getattr(c, "use_cache", None))
        if use_cache_off:
            notes.append(f"use_cache turned off (no KV cache in training) on: {', '.join(use_cache_off)}")
    backend_warnings = tuple(w for d in decls for w in d.warnings)
    for w in backend_warnings:
        warnings.warn(f"kbitprep: {w}", BackendWarning, stacklevel=3)
    notes.extend(f"warning: {w}" for w in backend_warnings)

    evidence = tuple(
        (f"[{info.name}] {e}" if len(sel.detections) > 1 else e) for info, det in sel.detections for e in det.evidence
    )
    log.debug(
        "plan for %s: backend %s, upcast %s (%d params), checkpointing %s (%s), %d notes",
        type(model).__name__, sel.primary.name, policy_label, sum(p.upcast for p in params), mode.value, mode_note,
        len(notes),
    )  # fmt: skip
    return Plan(
        model_type=class_path(model),
        backend=sel.primary.name,
        backends=tuple(info.name for info, _ in sel.detections),
        distributions=tuple(info.distribution for info, _ in sel.detections),
        evidence=evidence,
        forced=sel.forced,
        upcast_policy=policy_label,
        params=tuple(params),
        checkpointing=mode,
        checkpointing_note=mode_note,
        checkpointing_kwargs=ckpt_kwargs,
        hooks=tuple(hooks),
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
    )


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
