"""One reporter for the result tables printed at the end of a pytest run (row x check).

The backend matrix and the architecture families (both registered in ``tests/conftest.py``) each
fill a :class:`ResultTable` from their test reports (:func:`outcome` turns a report into a cell); pytest
then calls the table's ``pytest_terminal_summary``, which writes the section: a header line, one line per
row, the rows' notes, the reasons of the cells whose status the table explains, and an optional footer.

The suite runs on pytest-xdist workers, whose reports reach the controlling process, which prints the
summary. So a table reads its cells from the reports themselves, in ``pytest_runtest_logreport``
(which runs where the summary is written): a test's ``makereport`` hook marks the report with
:meth:`ResultTable.mark`, and ``cell_of`` (for the families: from the test's id) reads the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

__all__ = ["Cell", "ResultTable", "outcome"]

#: A cell: (status, reason), e.g. ``("pass", "")``, ``("FAIL", "AssertionError: ...")``, ``("skip", "why")``.
Cell = tuple[str, str]


def outcome(report: pytest.TestReport, *, limit: int | None = None) -> Cell | None:
    """The cell a test report gives: the call phase's outcome, or a setup that did not pass; ``None``
    for the other phases. A failure's reason is the first line of its crash message (else pytest's head
    line), a skip's the reason given to ``pytest.skip``; ``limit`` cuts reasons to that many characters."""
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return None
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = str(getattr(crash, "message", "") or "")
        reason = message.splitlines()[0] if message else (report.head_line or "")
        status = "FAIL"
    elif report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        status = "skip"
    else:
        reason, status = "", "pass"
    return status, reason[:limit] if limit is not None else reason


@dataclass(eq=False)  # a pytest plugin: pluggy keeps plugins in sets, so they hash by identity
class ResultTable:
    """A row x column table of test outcomes, written in pytest's terminal summary.

    Attributes:
        title: the section title.
        row_header: the header of the first column (``"backend"``, ``"family"``).
        columns: the columns, in order.
        col_width: the width of each column.
        rows: the rows in order (their labels size the first column); ``None``: the rows that have
            cells, sorted.
        present_columns_only: leave out the columns no row has a cell in.
        explain: status -> prefix: the cells with these statuses get a reason line
            ``"  row / column: <prefix><reason>"`` after the table.
        footer: returns a last line (or ``""`` for none).
        cell_of: report -> ``(row, column, cell)`` or ``None``: the cell a report fills, for tables that
            read it from the test's id (the default reads the :meth:`mark` of the report).
        cells: row -> column -> (status, reason); a missing cell shows ``-``.
        notes: row -> a note, written ``"  row: note"`` after the rows.
        seconds: the summed durations of the reports that filled a cell (setup, call and teardown).
    """

    title: str
    row_header: str
    columns: Sequence[str]
    col_width: int
    rows: Sequence[str] | None = None
    present_columns_only: bool = False
    explain: Mapping[str, str] = field(default_factory=lambda: {"skip": "skipped - "})
    footer: Callable[[], str] | None = None
    cell_of: Callable[[pytest.TestReport], tuple[str, str, Cell] | None] | None = None
    cells: dict[str, dict[str, Cell]] = field(default_factory=lambda: defaultdict(dict))
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def mark(self, report: pytest.TestReport, row: str, column: str, note: str = "", passed_as: str = "") -> None:
        """Mark ``report`` as filling the cell ``row`` / ``column`` (its outcome is the cell; a pass shows
        as ``passed_as`` where one is given), with a row note; the mark travels with the report to the
        process that prints the table."""
        report.user_properties.append((self.title, (row, column, note, passed_as)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """pytest's hook: record the cell ``report`` fills, if any."""
        if self.cell_of is not None:
            found = self.cell_of(report)
            if found is not None:
                self.seconds += report.duration
                self.record(*found)
            return
        for name, value in report.user_properties:
            if name != self.title:
                continue
            row, column, note, passed_as = cast(tuple[str, str, str, str], value)
            if note:
                self.notes[row] = note
            cell = outcome(report)
            if cell is not None:
                self.record(row, column, (passed_as, "") if passed_as and cell[0] == "pass" else cell)

    def record(self, row: str, column: str, cell: Cell) -> None:
        """Set one cell."""
        self.cells[row][column] = cell

    def lines(self) -> list[str]:
        """The section's lines (without the title), or none when no cell was recorded."""
        if not self.cells:
            return []
        columns = [c for c in self.columns if not self.present_columns_only or any(c in r for r in self.cells.values())]
        labels = list(self.rows) if self.rows is not None else sorted(self.cells)
        width = max(len(label) for label in labels) + 2
        out = [self.row_header.ljust(width) + "".join(c.ljust(self.col_width) for c in columns)]
        reasons: list[str] = []
        for label in labels:
            row = self.cells.get(label)
            if not row:
                continue
            out.append(label.ljust(width) + "".join(row.get(c, ("-", ""))[0].ljust(self.col_width) for c in columns))
            reasons += [
                f"  {label} / {c}: {self.explain[row[c][0]]}{row[c][1]}"
                for c in columns
                if c in row and row[c][0] in self.explain
            ]
        out += [f"  {label}: {note}" for label, note in sorted(self.notes.items())]
        out += reasons
        last = self.footer() if self.footer is not None else ""
        return out + ([last] if last else [])

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """pytest's hook: write the table as a section of the terminal summary."""
        lines = self.lines()
        if not lines:
            return
        terminalreporter.section(self.title)
        for line in lines:
            terminalreporter.write_line(line)
