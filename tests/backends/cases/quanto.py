"""optimum-quanto rows: int8 and int4 weights (quanto models cannot be saved: built in process each time)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, QuantoConfig

from ...tiny import saved_tiny_llama
from ..case import BackendCase

#: what PEFT's function raises when it casts the weights (the tensor class differs per bit width)
PEFT_CRASH = {
    "int8": "The dtype of a weights Tensor cannot be changed",
    "int4": "The dtype of a WeightQBitsTensor cannot be changed",
}


def load_quanto(weights: str) -> torch.nn.Module:
    """A tiny Llama reloaded with ``QuantoConfig(weights=...)`` (``"int8"`` or ``"int4"``).

    The first int4 forward in a fresh environment compiles quanto's C++ extension (30-45 s, cached after).
    """
    return AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.bfloat16), quantization_config=QuantoConfig(weights=weights), dtype=torch.bfloat16
    )


CASES = [
    BackendCase(
        id=f"quanto-{w}",
        backend="quanto",
        build=lambda w=w: load_quanto(w),
        requires=("optimum.quanto",),
        peft_fails=PEFT_CRASH[w],
    )
    for w in ("int8", "int4")
]
