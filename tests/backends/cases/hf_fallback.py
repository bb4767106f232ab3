"""hf-quantizer fallback row: a transformers quantizer no plugin claims (BitNet, AutoBitLinear online)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitNetQuantConfig

from ...tiny import tiny_llama
from ..case import BackendCase


@functools.cache
def saved_bitnet(mode: str = "online") -> Path:
    """A tiny Llama saved with a BitNet ``quantization_config`` (``autobitlinear``, ``online`` or ``offline``).

    transformers only loads BitNet "pre-quantized": the config says so and ``AutoBitLinear`` layers
    replace the Linears at load time; online mode quantizes the bf16 weights in every forward.
    """
    path = Path(tempfile.mkdtemp(prefix=f"kbitprep-bitnet-{mode}-"))
    model = tiny_llama(torch.bfloat16)
    model.config.quantization_config = BitNetQuantConfig(linear_class="autobitlinear", quantization_mode=mode).to_dict()
    model.save_pretrained(path)
    return path


def load_bitnet(mode: str = "online") -> torch.nn.Module:
    """A real BitNet-quantized tiny Llama carrying transformers' ``BitNetHfQuantizer``."""
    return AutoModelForCausalLM.from_pretrained(saved_bitnet(mode), dtype=torch.bfloat16)


CASES = [
    BackendCase(
        id="hf-quantizer-bitnet",
        backend="hf-quantizer",
        build=load_bitnet,
        notes="BitNet AutoBitLinear (online): no kbitprep plugin claims it",
    )
]
