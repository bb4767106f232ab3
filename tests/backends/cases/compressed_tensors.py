"""compressed-tensors rows: int4 (packed, group 32) and int8 (per channel) tiny Llamas, built with
compressed-tensors' own API, saved and reloaded by transformers (still compressed)."""

from __future__ import annotations

from ..builders_compressed_tensors import ct_llama
from ..case import BackendCase

CASES = [
    BackendCase(
        id="compressed-tensors-int4",
        backend="compressed-tensors",
        build=lambda: ct_llama(4),
        requires=("compressed_tensors",),
        notes="pack-quantized: weight_packed int32 + bf16 weight_scale, no weight until the first forward",
    ),
    BackendCase(
        id="compressed-tensors-int8",
        backend="compressed-tensors",
        build=lambda: ct_llama(8),
        requires=("compressed_tensors",),
        notes="int-quantized: int8 weight + bf16 weight_scale",
    ),
]
