"""Raises at import time with something other than ImportError, as a plugin probing for a GPU might."""

from __future__ import annotations

raise RuntimeError("no CUDA driver found while loading the fused kernels of kbitprep_broken_import_raises")
