"""EETQ row: transformers' real EetqLinear layers with a stand-in for EETQ's CUDA kernel (see builders_eetq)."""

from __future__ import annotations

from ..builders_eetq import STAND_IN, eetq_llama, eetq_stand_in
from ..case import BackendCase

CASES = [
    BackendCase(
        id="eetq-int8",
        backend="eetq",
        build=eetq_llama,
        requires=("transformers", "peft"),
        stand_in=STAND_IN,
        context=eetq_stand_in,
        notes="int8 [in, out] weight + fp16 weight_scales, per-output-channel symmetric",
    ),
]
