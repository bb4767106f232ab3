"""Imports a quantization library that does not exist, as a plugin whose dependency is missing does."""

from __future__ import annotations

import kbitprep_no_such_quant_library  # type: ignore[import-not-found]  # noqa: F401  (the fault)

from kbitprep.plugin import Backend


class ImportBrokenBackend(Backend):
    """Never reached: the import above fails."""

    name = "broken-import"
