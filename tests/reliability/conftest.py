"""Fixtures of the reliability tests and the closing figures of the run."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kbitprep import Registry

from ..distributions import install
from . import figures
from .support import recorded_warnings

#: the broken plugin distributions under tests/dists/, one fault each
BROKEN_DISTS = (
    "broken-import",
    "broken-import-raises",
    "broken-contract",
    "broken-name-clash",
    "broken-detect-raises",
    "broken-detect-answer",
    "broken-declarations",
    "broken-fixup",
)


@pytest.fixture(scope="session")
def broken_sites() -> Iterator[dict[str, Path]]:
    """Every broken distribution pip-installed (in parallel, once), by name -> its site directory."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        sites = dict(zip(BROKEN_DISTS, pool.map(install, BROKEN_DISTS)))
    yield sites


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """A registry of the installed backends only (no broken distribution), one per test module (discovery once)."""
    with recorded_warnings():
        reg = Registry(strict=False)
        reg.names()
    yield reg


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not (figures.FAULTS or figures.EXAMPLES or figures.STATE_CHECKS[0]):
        return
    tr = terminalreporter
    tr.section("kbitprep reliability figures")
    tr.write_line(f"fault kinds injected and verified: {len(figures.FAULTS)}")
    for kind, how in sorted(figures.FAULTS.items()):
        tr.write_line(f"  {kind}: {how}")
    total = sum(figures.EXAMPLES.values())
    per = ", ".join(f"{t} {n}" for t, n in sorted(figures.EXAMPLES.items()))
    tr.write_line(f"property-test examples run: {total}" + (f" ({per})" if per else ""))
    if figures.COVERAGE:
        tr.write_line("  examples with: " + ", ".join(f"{k} {n}" for k, n in sorted(figures.COVERAGE.items())))
    tr.write_line(
        f"full model-state comparisons after a failure or undo: {figures.STATE_CHECKS[0]}; "
        f"partial states found: {len(figures.PARTIAL)}"
    )
    for what in figures.PARTIAL:
        tr.write_line(f"  PARTIAL STATE: {what}")
