"""Shared test configuration: the backend matrix printed at the end of the run."""

from __future__ import annotations

import os
import warnings

import pytest

from .families import family_table
from .reporting import ResultTable

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")

CHECKS = ("detect", "plan", "storage", "train-reentrant", "train-non-reentrant", "undo", "peft-parity")
#: case id x check; the cells come from the tests marked ``matrix(check)``
MATRIX = ResultTable(
    title="kbitprep backend matrix (backend x check)",
    row_header="backend",
    columns=CHECKS,
    col_width=21,
    present_columns_only=True,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix(check): a check of the per-backend matrix")
    if not config.pluginmanager.is_registered(MATRIX):
        config.pluginmanager.register(MATRIX, "kbitprep-backend-matrix")
    if config.pluginmanager.get_plugin("kbitprep-family-table") is None:
        config.pluginmanager.register(family_table(), "kbitprep-family-table")


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
    note = ""
    if case.stand_in:
        note = f"stand-in: {case.stand_in}"
    if case.not_trainable:
        note = "not trainable: prepare and the drop-in refuse it up front (NotTrainableError)"
    refused = bool(case.not_trainable) and check not in ("detect", "plan")
    MATRIX.mark(rep, case.id, check, note, passed_as="refused" if refused else "")
    return rep
