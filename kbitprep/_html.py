"""Compact HTML for notebooks: a plan or report as one small table (``_repr_html_``)."""

from __future__ import annotations

from html import escape

from ._render import PlanView, ReportView
from ._render import format_bytes as human_bytes

__all__ = ["plan_html", "report_html"]

_STYLE = "border-collapse:collapse;font-family:monospace;font-size:12px;text-align:right;margin:4px 0"
_CELL = "padding:2px 8px;border-bottom:1px solid #ccc"


def _row(cells: list[str], header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f'<{tag} style="{_CELL}">{escape(c)}</{tag}>' for c in cells) + "</tr>"


def _facts(plan: PlanView) -> list[tuple[str, str]]:
    facts = [
        ("backend", f"{plan.backend} ({', '.join(plan.distributions)})"),
        ("trainable", "yes" if plan.trainable else f"no: {plan.not_trainable_reason}"),
        ("upcast policy", plan.upcast_policy),
        ("checkpointing", f"{plan.checkpointing.value} ({plan.checkpointing_note})"),
        ("parameter memory", f"{human_bytes(plan.bytes_before)} -> {human_bytes(plan.bytes_after)}"),
    ]
    facts += [("hook", h) for h in plan.hooks]
    facts += [("fix-up", f"{f.name}: {f.description}") for f in plan.fixups]
    facts += [("note", n) for n in plan.notes]
    return facts


def plan_html(plan: PlanView, title: str | None = None) -> str:
    """The plan as a heading, a list of facts and the per-module-type table."""
    head = escape(title or f"kbitprep plan for {plan.model_type}")
    facts = "".join(
        f'<tr><th style="{_CELL};text-align:left">{escape(k)}</th>'
        f'<td style="{_CELL};text-align:left">{escape(v)}</td></tr>'
        for k, v in _facts(plan)
    )
    rows = [_row(["module type", "params", "quantized", "freeze", "upcast", "bytes before", "bytes after"], True)]
    groups = plan.by_module_type()
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["bytes_before"]):
        rows.append(
            _row(
                [
                    name,
                    str(g["params"]),
                    str(g["quantized"]),
                    str(g["frozen"]),
                    str(g["upcast"]),
                    human_bytes(g["bytes_before"]),
                    human_bytes(g["bytes_after"]),
                ]
            )
        )
    rows.append(
        _row(
            [
                "TOTAL",
                str(len(plan.params)),
                str(len(plan.quantized)),
                str(len(plan.to_freeze)),
                str(len(plan.to_upcast)),
                human_bytes(plan.bytes_before),
                human_bytes(plan.bytes_after),
            ]
        )
    )
    return (
        f'<div class="kbitprep"><strong>{head}</strong>'
        f'<table style="{_STYLE}">{facts}</table>'
        f'<table style="{_STYLE}">{"".join(rows)}</table></div>'
    )


def report_html(report: ReportView) -> str:
    """The report: the applied plan's table and the steps that ran."""
    steps = "".join(f"<li>{escape(s)}</li>" for s in report.steps)
    body = plan_html(report.plan, f"kbitprep report for {report.plan.model_type}")
    flow = f"<div>gradient flow: {escape(report.gradient_flow)}</div>" if report.gradient_flow else ""
    return f"{body}<div>steps ({report.seconds * 1000:.1f} ms):<ol>{steps}</ol></div>{flow}"
