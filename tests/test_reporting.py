"""The one reporter of the end-of-run tables (``tests/reporting.py``): cells from test reports, the layout."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from .reporting import ResultTable, outcome


def _report(when: str, result: str, longrepr: Any = None) -> pytest.TestReport:
    return pytest.TestReport("t.py::test_x[a]", ("t.py", 1, "test_x[a]"), {}, result, longrepr, when)  # type: ignore[arg-type]


def test_a_report_gives_the_cell_of_its_call_or_of_a_setup_that_did_not_pass() -> None:
    crash = SimpleNamespace(reprcrash=SimpleNamespace(message="AssertionError: 3 problems\nmore lines"))
    assert outcome(_report("call", "passed")) == ("pass", "")
    assert outcome(_report("call", "failed", crash)) == ("FAIL", "AssertionError: 3 problems")
    assert outcome(_report("call", "failed", crash), limit=9) == ("FAIL", "Assertion")
    assert outcome(_report("setup", "skipped", ("t.py", 3, "Skipped: needs CUDA"))) == ("skip", "needs CUDA")
    assert outcome(_report("setup", "passed")) is None
    assert outcome(_report("teardown", "passed")) is None


def test_the_table_layout_rows_notes_reasons_and_footer() -> None:
    table = ResultTable(
        title="t",
        row_header="case",
        columns=("a", "b", "c"),
        col_width=6,
        present_columns_only=True,
        footer=lambda: "(done)",
    )
    assert table.lines() == []  # nothing recorded: no section
    table.record("zz", "a", ("pass", ""))
    table.record("x", "a", ("skip", "no lib"))
    table.record("x", "c", ("FAIL", "boom"))
    table.notes["zz"] = "stand-in"
    assert table.lines() == [
        "case" + "a".ljust(6) + "c".ljust(6),  # column b has no cell: left out
        "x   " + "skip".ljust(6) + "FAIL".ljust(6),
        "zz  " + "pass".ljust(6) + "-".ljust(6),
        "  zz: stand-in",
        "  x / a: skipped - no lib",  # only the statuses in `explain` get a reason line
        "(done)",
    ]
    ordered = ResultTable(title="t", row_header="row", columns=("a",), col_width=5, rows=("long-row", "x"))
    ordered.record("x", "a", ("FAIL", "why"))
    ordered.explain = {"FAIL": ""}
    assert ordered.lines() == ["row       a    ", "x         FAIL ", "  x / a: why"]


def test_marked_reports_fill_the_table_where_the_summary_is_written() -> None:
    """Under pytest-xdist the reports reach the controlling process, which prints the table: a mark set
    in ``makereport`` (on the report's ``user_properties``) is all the table reads, with the report's
    outcome; a pass can show as another status (the matrix's ``refused``)."""
    table = ResultTable(title="matrix", row_header="case", columns=("a", "b"), col_width=8)
    other = ResultTable(title="other", row_header="case", columns=("a",), col_width=8)
    passed, failed = _report("call", "passed"), _report("call", "failed", "boom")
    table.mark(passed, "x", "a", note="stand-in", passed_as="refused")
    table.mark(failed, "x", "b")
    for report in (passed, failed, _report("call", "passed")):  # the last one is not marked: no cell
        table.pytest_runtest_logreport(report)
        other.pytest_runtest_logreport(report)  # another table's marks are not its own
    assert table.cells == {"x": {"a": ("refused", ""), "b": ("FAIL", "test_x[a]")}}  # no crash line: the head line
    assert table.notes == {"x": "stand-in"} and not other.cells
