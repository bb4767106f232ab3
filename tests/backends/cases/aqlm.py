"""AQLM row: a tiny Llama with hand-built 1x16 AQLM layers, saved and reloaded by transformers.

8-bit codebooks are not a row: they cannot train with PEFT's LoRA on the CPU, and kbitprep says
so before training (``tests/backends/test_traps_aqlm.py``).
"""

from __future__ import annotations

from ..builders_aqlm import aqlm_llama
from ..case import BackendCase

CASES = [
    BackendCase(
        id="aqlm-1x16",
        backend="aqlm",
        build=aqlm_llama,
        requires=("aqlm",),
        notes="aqlm.QuantizedLinear built by hand (transformers cannot quantize AQLM), reloaded via AqlmConfig",
    ),
]
