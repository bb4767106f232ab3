"""Shared test configuration: the backend matrix printed at the end of the run."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict

import pytest

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")

# case id -> check -> (status, reason)
MATRIX: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
MATRIX_NOTES: dict[str, str] = {}
CHECKS = ("detect", "plan", "storage", "train-reentrant", "train-non-reentrant", "undo", "peft-parity")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix(check): a check of the per-backend matrix")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    marker = item.get_closest_marker("matrix")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None or "case" not in callspec.params:
        return rep
    case = callspec.params["case"]
    check = marker.args[0]
    if "mode" in callspec.params:
        check = f"{check}-{callspec.params['mode'].replace('_', '-')}"
    if case.stand_in:
        MATRIX_NOTES[case.id] = f"stand-in: {case.stand_in}"
    if case.not_trainable:
        MATRIX_NOTES[case.id] = "not trainable: prepare and the drop-in refuse it up front (NotTrainableError)"
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        if rep.skipped:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            MATRIX[case.id][check] = ("skip", reason.removeprefix("Skipped: "))
        elif rep.failed:
            MATRIX[case.id][check] = ("FAIL", rep.head_line or "")
        else:
            refused = bool(case.not_trainable) and check not in ("detect", "plan")
            MATRIX[case.id][check] = ("refused" if refused else "pass", "")
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not MATRIX:
        return
    tr = terminalreporter
    tr.section("kbitprep backend matrix (backend x check)")
    checks = [c for c in CHECKS if any(c in row for row in MATRIX.values())]
    width = max(len(k) for k in MATRIX) + 2
    tr.write_line("backend".ljust(width) + "".join(c.ljust(21) for c in checks))
    reasons: list[str] = []
    for case_id in sorted(MATRIX):
        row = MATRIX[case_id]
        cells = []
        for c in checks:
            status, reason = row.get(c, ("-", ""))
            if status == "skip":
                reasons.append(f"  {case_id} / {c}: skipped - {reason}")
            cells.append(status.ljust(21))
        tr.write_line(case_id.ljust(width) + "".join(cells))
    for case_id, note in sorted(MATRIX_NOTES.items()):
        tr.write_line(f"  {case_id}: {note}")
    for r in reasons:
        tr.write_line(r)
