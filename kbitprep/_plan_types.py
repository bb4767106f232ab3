"""The data types of a plan and of its application: :class:`ParamPlan`, :class:`Plan`, :class:`Report`.

The bottom of the core: the planner builds these, the mutation site applies them, and the renderers,
the FSDP check and the memory modes read them, all without importing one another. Their text and
HTML displays call the renderers (``kbitprep._render``, ``kbitprep._html``), which format any object
with the attributes of :class:`~kbitprep._render.PlanView` and import nothing from here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .plugin import CheckpointMode, Declarations, FixUp

__all__ = ["ParamPlan", "Plan", "Report"]


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
    #: Qualified names of the modules kbitprep hooks itself so that every checkpointed stack receives inputs
    #: that require grad (``hooks`` says which and why): input embeddings get a forward hook, the layers of a
    #: stack that no hooked embedding feeds (a speech encoder, a vision tower) a forward pre-hook each.
    input_grads_hooks: tuple[str, ...] = ()
    #: Whether prepare installs fp32 master weights for half-precision parameters that become trainable
    #: after prepare (PEFT's ``modules_to_save``, ``trainable_token_indices``; see ``kbitprep._master_weights``).
    #: Off for the drop-in, which upcasts as PEFT does.
    master_weights: bool = False

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


@dataclass(frozen=True)
class Report:
    """What prepare did: the plan it applied and what it observed while applying it.

    Attributes:
        plan: the applied :class:`~kbitprep.Plan`.
        seconds: wall time of the apply.
        hooks_added: forward hooks added to the model (module name and hook name).
        steps: the steps run, in order.
        gradient_flow: the gradient-flow check's result (``prepare(..., verify=True)``), or ``""``.
    """

    plan: Plan
    seconds: float
    hooks_added: tuple[str, ...]
    steps: tuple[str, ...]
    #: The result of the gradient-flow check ``prepare(..., verify=True)`` ran, in one line; ``""`` when none ran.
    gradient_flow: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "plan": self.plan.to_dict(params=False),
            "seconds": self.seconds,
            "hooks_added": list(self.hooks_added),
            "steps": list(self.steps),
            "gradient_flow": self.gradient_flow,
        }

    def __str__(self) -> str:
        from ._render import render_report

        return render_report(self)

    def __repr__(self) -> str:
        """One line: backend, model class, steps and time (``print(report)`` for the full text)."""
        return (
            f"<Report {self.plan.backend} for {self.plan.model_type.rsplit('.', 1)[-1]}: "
            f"{len(self.steps)} steps in {self.seconds * 1000:.1f} ms, {len(self.hooks_added)} hooks added>"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython / Jupyter text display: the report."""
        printer.text(repr(self) if cycle else str(self))

    def _repr_html_(self) -> str:
        """Jupyter display: the applied plan's table and the steps."""
        from ._html import report_html

        return report_html(self)
