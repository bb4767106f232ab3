"""One reporter for the result tables printed at the end of a pytest run (row x check).

The backend matrix (``tests/conftest.py``) and the architecture families
(``tests/test_architecture_families.py``) each fill a :class:`ResultTable` from their test reports
(:func:`outcome` turns a report into a cell) and register it as a pytest plugin; pytest then calls its
``pytest_terminal_summary``, which writes the section: a header line, one line per row, the rows'
notes, the reasons of the cells whose status the table explains, and an optional footer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
        cells: row -> column -> (status, reason); a missing cell shows ``-``.
        notes: row -> a note, written ``"  row: note"`` after the rows.
    """

    title: str
    row_header: str
    columns: Sequence[str]
    col_width: int
    rows: Sequence[str] | None = None
    present_columns_only: bool = False
    explain: Mapping[str, str] = field(default_factory=lambda: {"skip": "skipped - "})
    footer: Callable[[], str] | None = None
    cells: dict[str, dict[str, Cell]] = field(default_factory=lambda: defaultdict(dict))
    notes: dict[str, str] = field(default_factory=dict)

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
