"""Plans and reports in a REPL or notebook: a short repr, the table for IPython, compact HTML."""

from __future__ import annotations

from html.parser import HTMLParser

import kbitprep

from ..tiny import tiny_llama


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag not in ("br",):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.cells.append(data.strip())


class _Printer:
    def __init__(self) -> None:
        self.out = ""

    def text(self, s: str) -> None:
        self.out += s


def test_plan_repr_is_one_short_line() -> None:
    plan = kbitprep.plan(tiny_llama())
    r = repr(plan)
    assert "\n" not in r and len(r) < 200, r
    assert r.startswith("<Plan unquantized for LlamaForCausalLM: 21 params, freeze 21, upcast 0")
    assert len(str(plan)) > len(r)


def test_plan_pretty_is_the_table() -> None:
    plan = kbitprep.plan(tiny_llama())
    p = _Printer()
    plan._repr_pretty_(p, cycle=False)
    assert p.out == str(plan)


def test_plan_html_is_well_formed_and_holds_the_totals() -> None:
    plan = kbitprep.plan(tiny_llama(), upcast="norms")
    html = plan._repr_html_()
    parser = _Collect()
    parser.feed(html)
    assert parser.open == []
    assert "TOTAL" in parser.cells and "LlamaRMSNorm" in parser.cells
    assert str(len(plan.to_upcast)) in parser.cells
    assert len(html) < 6000, len(html)


def test_report_repr_and_html() -> None:
    model = tiny_llama()
    kbitprep.prepare(model)
    rep = kbitprep.report(model)
    assert "\n" not in repr(rep) and repr(rep).startswith("<Report unquantized for LlamaForCausalLM:")
    parser = _Collect()
    parser.feed(rep._repr_html_())
    assert parser.open == [] and any(c.startswith("froze") for c in parser.cells)
    p = _Printer()
    rep._repr_pretty_(p, cycle=False)
    assert p.out == str(rep)


def test_a_plan_pickles_without_its_model_reference() -> None:
    import pickle

    import pytest

    model = tiny_llama()
    plan = kbitprep.plan(model)
    again = pickle.loads(pickle.dumps(plan))
    assert again.to_dict() == plan.to_dict() and again.fingerprint == ()
    with pytest.raises(kbitprep.PlanMismatchError, match="another model"):
        kbitprep.prepare(model, plan=again)
