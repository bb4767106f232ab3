"""Plain-text rendering of plans and reports (aligned tables, no colour)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["ParamView", "PlanView", "ReportView", "format_bytes", "render_plan", "render_report", "table"]


class _Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...


class _Mode(Protocol):
    @property
    def value(self) -> str: ...


class ParamView(Protocol):
    """What the renderers read of one parameter's plan (:class:`kbitprep.ParamPlan` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def module_type(self) -> str: ...
    @property
    def dtype_before(self) -> Any: ...
    @property
    def dtype_after(self) -> Any: ...


class PlanView(Protocol):
    """What the renderers read of a plan (:class:`kbitprep.Plan` has it). The renderers depend on this
    shape only, so the plan's types import them for their displays without an import cycle."""

    @property
    def model_type(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def backends(self) -> Sequence[str]: ...
    @property
    def distributions(self) -> Sequence[str]: ...
    @property
    def evidence(self) -> Sequence[str]: ...
    @property
    def forced(self) -> bool: ...
    @property
    def trainable(self) -> bool: ...
    @property
    def not_trainable_reason(self) -> str: ...
    @property
    def upcast_policy(self) -> str: ...
    @property
    def checkpointing(self) -> _Mode: ...
    @property
    def checkpointing_note(self) -> str: ...
    @property
    def checkpointing_kwargs(self) -> Mapping[str, Any]: ...
    @property
    def hooks(self) -> Sequence[str]: ...
    @property
    def fixups(self) -> Sequence[_Named]: ...
    @property
    def notes(self) -> Sequence[str]: ...
    @property
    def extras(self) -> Mapping[str, Any]: ...
    @property
    def params(self) -> Sequence[ParamView]: ...
    @property
    def quantized(self) -> Sequence[ParamView]: ...
    @property
    def to_freeze(self) -> Sequence[ParamView]: ...
    @property
    def to_upcast(self) -> Sequence[ParamView]: ...
    @property
    def bytes_before(self) -> int: ...
    @property
    def bytes_after(self) -> int: ...
    @property
    def byte_delta(self) -> int: ...
    def by_module_type(self) -> dict[str, dict[str, int]]: ...


class ReportView(Protocol):
    """What the renderers read of a report (:class:`kbitprep.Report` has it)."""

    @property
    def plan(self) -> PlanView: ...
    @property
    def seconds(self) -> float: ...
    @property
    def steps(self) -> Sequence[str]: ...
    @property
    def hooks_added(self) -> Sequence[str]: ...
    @property
    def gradient_flow(self) -> str: ...


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; signed values keep their sign."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()) -> str:
    """An aligned text table; columns listed in ``right`` are right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def render_plan(plan: PlanView) -> str:
    """The plan as a readable block of text."""
    head = f"kbitprep plan for {plan.model_type}"
    lines = [head, "=" * len(head)]
    chosen = plan.backend if len(plan.backends) == 1 else " + ".join(plan.backends)
    lines.append(
        f"backend        : {chosen} (from {', '.join(dict.fromkeys(plan.distributions))})"
        + ("  [forced]" if plan.forced else "")
    )
    for e in plan.evidence:
        lines.append(f"  evidence     : {e}")
    lines.append(f"trainable      : {'yes' if plan.trainable else 'NO - ' + plan.not_trainable_reason}")
    lines.append(f"upcast policy  : {plan.upcast_policy}")
    kw = ", ".join(f"{k}={v!r}" for k, v in plan.checkpointing_kwargs.items())
    lines.append(
        f"checkpointing  : {plan.checkpointing.value} ({plan.checkpointing_note})" + (f" [{kw}]" if kw else "")
    )
    for h in plan.hooks or ("none",):
        lines.append(f"hooks          : {h}")
    for f in plan.fixups:
        lines.append(f"fix-up         : {f.name} - {f.description}")
    for k, v in plan.extras.items():
        shown = ", ".join(f"{a}={b!r}" for a, b in v.items()) if isinstance(v, dict) else v
        lines.append(f"{k:<15}: {shown}")
    lines.append("")
    rows = []
    for kind, g in sorted(plan.by_module_type().items(), key=lambda kv: -kv[1]["bytes_before"]):
        rows.append(
            [
                kind,
                g["params"],
                g["quantized"],
                g["frozen"],
                g["upcast"],
                format_bytes(g["bytes_before"]),
                format_bytes(g["bytes_after"]),
            ]
        )
    rows.append(
        [
            "TOTAL",
            len(plan.params),
            len(plan.quantized),
            len(plan.to_freeze),
            len(plan.to_upcast),
            format_bytes(plan.bytes_before),
            format_bytes(plan.bytes_after),
        ]
    )
    lines.append(
        table(
            ["module type", "params", "quantized", "freeze", "upcast", "bytes before", "bytes after"],
            rows,
            right=(1, 2, 3, 4, 5, 6),
        )
    )
    delta = plan.byte_delta
    lines.append(f"parameter memory change: {'+' if delta >= 0 else ''}{format_bytes(delta)}")
    for n in plan.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def render_report(report: ReportView) -> str:
    """A report as text: the plan, then what was done."""
    lines = [render_plan(report.plan), "", f"applied in {report.seconds * 1000:.1f} ms:"]
    lines += [f"  - {s}" for s in report.steps]
    for h in report.hooks_added:
        lines.append(f"  - hook added: {h}")
    if report.gradient_flow:
        lines.append(f"gradient flow  : {report.gradient_flow}")
    return "\n".join(lines)
