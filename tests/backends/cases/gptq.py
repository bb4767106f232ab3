"""GPTQ row: a tiny Llama quantized by gptqmodel (4-bit, group size 32) once per session, reloaded per test."""

from __future__ import annotations

from ..builders_gptq import gptq_llama
from ..case import BackendCase

CASES = [
    BackendCase(
        id="gptq-4bit",
        backend="gptq",
        build=gptq_llama,
        requires=("gptqmodel", "tokenizers"),
        notes="gptqmodel TorchAtenLinear; quantized once per session (10-50 s), reloaded per test",
    ),
]
