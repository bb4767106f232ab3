"""Collects every ``CASES`` list from ``tests/backends/cases/*.py`` (one file per backend)."""

from __future__ import annotations

import importlib
import pkgutil

from . import cases as _cases_pkg
from .case import BackendCase


def all_cases() -> list[BackendCase]:
    """Every backend case, in file-name order."""
    found: list[BackendCase] = []
    for info in sorted(pkgutil.iter_modules(_cases_pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{_cases_pkg.__name__}.{info.name}")
        found.extend(getattr(mod, "CASES", []))
    ids = [c.id for c in found]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise RuntimeError(f"duplicate backend case ids: {sorted(dupes)}")
    return found
